"""Fine-tune an hf-moe model with expert parallelism and data parallelism under `accelerate launch`.

    accelerate launch --num_processes 4 examples/finetune_ep.py MODEL --expert-parallel-size 2
    accelerate launch --num_processes 4 examples/finetune_ep.py MODEL --expert-parallel-size 2 --resume out/ep/last
    python examples/finetune_ep.py MODEL                    # one process (--expert-parallel-size 1): no launcher
    accelerate launch --num_processes 4 examples/finetune_ep.py MODEL --expert-parallel-size 2 --padded-dispatch
    accelerate launch --num_processes 4 examples/finetune_ep.py MODEL --expert-parallel-size 2 --bf16 --cuda-graphs

On a machine without GPUs add `--multi_gpu` (accelerate's multi-process launcher; the processes then use gloo).

`--fsdp` shards with FSDP2 instead of replicating (GPUs; configs under examples/accelerate/): experts over their
expert-data-parallel group, everything else over all processes, through accelerate's
`FullyShardedDataParallelPlugin(fsdp_version=2)`; checkpoints are accelerate's distributed checkpoints
(`save_state`), which resume at another number of processes or `--expert-parallel-size`:

    accelerate launch --config_file examples/accelerate/fsdp2_ep_1node.yaml examples/finetune_ep.py MODEL \
        --expert-parallel-size 2 --fsdp
    accelerate launch --config_file examples/accelerate/fsdp2_ep_1node.yaml examples/finetune_ep.py MODEL \
        --expert-parallel-size 4 --fsdp --resume out/ep/last

W processes = P (expert-parallel size) × D replicas. Each process holds E/P experts and reads only those from the
checkpoint; attention, norms, embeddings and routers are replicated and averaged by DDP; expert gradients are
synced by `hf_moe.parallel.finish_gradients`, which also clips by the global gradient norm. Works on CPUs (gloo)
and GPUs (NCCL) unchanged.

`--resume CKPT` continues where CKPT stopped: same weights, optimizer state and data position (the batches
already consumed are skipped, so the run sees what an uninterrupted one would). It writes into a new folder,
`CKPT-resumed` unless `--output-dir` says otherwise, and never over CKPT itself without `--overwrite-resumed`.
"""

import argparse
import glob
import os
import sysconfig

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from tqdm.auto import tqdm
from transformers import AutoTokenizer

import hf_moe
from hf_moe.parallel import finish_gradients, save_expert_parallel


def text_blocks(tokenizer, train_file: str | None, block_size: int, max_bytes: int) -> torch.Tensor:
    """Token blocks from a text file, or from the standard library's sources (text every Python install has)."""
    if train_file:
        with open(train_file, encoding="utf-8") as f:
            text = f.read()[:max_bytes]
    else:
        text = ""
        for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
            with open(path, encoding="utf-8", errors="replace") as f:
                text += f.read()
            if len(text) >= max_bytes:
                break
    ids = torch.tensor(tokenizer(text[:max_bytes])["input_ids"])
    return ids[: len(ids) // block_size * block_size].view(-1, block_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="hf-moe model folder (with tokenizer)")
    parser.add_argument("--expert-parallel-size", type=int, default=1, help="P; must divide the number of processes")
    parser.add_argument("--output-dir", default=None,
                        help="checkpoints go to OUTPUT_DIR/last (default: out/ep, or CKPT-resumed with --resume CKPT)")
    parser.add_argument("--train-file", default=None)
    parser.add_argument("--max-bytes", type=int, default=500_000)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume", default=None, help="checkpoint folder written by this script")
    parser.add_argument("--overwrite-resumed", action="store_true",
                        help="allow saving over the checkpoint given to --resume (refused otherwise)")
    parser.add_argument("--padded-dispatch", action="store_true",
                        help="send every token to every rank of its EP group: no host sync per MoE layer (faster on "
                             "GPUs at small P); fine here, since every batch is batch-size x block-size tokens")
    parser.add_argument("--bf16", action="store_true", help="load and train the weights in bfloat16")
    parser.add_argument("--fsdp", action="store_true",
                        help="FSDP2 + expert parallelism (hf_moe.fully_shard_moe): launch with an accelerate config "
                             "that has fsdp_version: 2 (examples/accelerate/)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="GPUs with --bf16: replay the MoE blocks' forward and backward from CUDA graphs "
                             "(hf_moe.capture_moe_cuda_graphs; implies --padded-dispatch)")
    args = parser.parse_args()

    output_dir = args.output_dir or (args.resume.rstrip("/\\") + "-resumed" if args.resume else "out/ep")
    last = os.path.join(output_dir, "last")
    if args.resume and not args.overwrite_resumed and os.path.realpath(last) == os.path.realpath(args.resume):
        parser.error(f"saving to {last} would overwrite the checkpoint being resumed: pick another --output-dir "
                     "or pass --overwrite-resumed")
    # a seedable sampler makes each epoch's order a function of (data_seed, epoch), so a resumed run can find it
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))
    start_step, start_batches = 0, 0
    source = args.resume or args.model
    if args.resume:
        with open(os.path.join(args.resume, "step.txt")) as f:
            start_step = int(f.read())
        with open(os.path.join(args.resume, "batches.txt")) as f:
            start_batches = int(f.read())
    # one process and P = 1 (plain `python`): no process group, an ordinary model and checkpoint
    distributed = accelerator.num_processes > 1 or args.expert_parallel_size > 1
    dtype = torch.bfloat16 if args.bf16 else None
    if distributed:
        model = hf_moe.HfMoeForCausalLM.from_pretrained(
            source, expert_parallel_size=args.expert_parallel_size, device=accelerator.device, dtype=dtype,
            padded_dispatch=args.padded_dispatch or args.cuda_graphs,
        )
    else:
        model = hf_moe.HfMoeForCausalLM.from_pretrained(source, dtype=dtype).to(accelerator.device)
    model.train()
    if args.fsdp and args.cuda_graphs:
        parser.error("--cuda-graphs does not combine with --fsdp")
    if args.cuda_graphs:  # before accelerator.prepare: DDP must wrap the captured model, not the other way round
        hf_moe.capture_moe_cuda_graphs(model, args.batch_size, args.block_size)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    blocks = text_blocks(tokenizer, args.train_file, args.block_size, args.max_bytes)
    loader = torch.utils.data.DataLoader(blocks, batch_size=args.batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if args.fsdp:  # experts sharded now; accelerator.prepare shards the rest
        hf_moe.fully_shard_moe(model, accelerator, optimizer)
    ddp, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    optimizer_file = f"optimizer-rank{accelerator.process_index}.pt"
    if args.resume and args.fsdp:
        accelerator.load_state(os.path.join(args.resume, "state"))
    elif args.resume and os.path.isfile(os.path.join(args.resume, optimizer_file)):
        optimizer.load_state_dict(torch.load(os.path.join(args.resume, optimizer_file)))

    def save(step: int, batches: int, folder: str) -> None:
        if distributed:
            save_expert_parallel(model, folder)
        else:
            model.save_pretrained(folder)
        if args.fsdp:  # sharded weights and optimizer state: resumable at another W or P
            accelerator.save_state(os.path.join(folder, "state"))
        else:
            torch.save(optimizer.state_dict(), os.path.join(folder, optimizer_file))
        if accelerator.is_main_process:
            tokenizer.save_pretrained(folder)
            for name, value in (("step.txt", step), ("batches.txt", batches)):  # batches: per process, all epochs
                with open(os.path.join(folder, name), "w") as f:
                    f.write(str(value))
        accelerator.wait_for_everyone()

    step, micro = start_step, start_batches
    epoch, skip = divmod(start_batches, len(loader))
    bar = tqdm(total=args.steps, initial=step, desc="ep fine-tune", disable=not accelerator.is_main_process)
    while step < args.steps:
        loader.set_epoch(epoch)
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            with accelerator.accumulate(ddp):
                out = ddp(input_ids=batch, labels=batch, output_router_logits=True)
                accelerator.backward(out.loss)
                micro += 1
                if accelerator.sync_gradients:
                    norm = finish_gradients(ddp, max_norm=args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update()
            if step % args.log_every == 0 or step == args.steps:
                loads = torch.stack([r.tokens_per_expert for r in out.router_outputs])
                max_load = (loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)).max()
                metrics = {"loss": out.loss.detach(), "aux_loss": out.aux_loss.detach(), "max_load": max_load}
                metrics = {k: accelerator.reduce(v.float(), "mean").item() for k, v in metrics.items()}
                accelerator.print(f"step {step}: loss {metrics['loss']:.4f}  aux {metrics['aux_loss']:.4f}  "
                          f"max/mean expert load {metrics['max_load']:.2f}  grad norm {norm.item():.3f}")
            if args.save_every and step % args.save_every == 0:
                save(step, micro, last)
            if step >= args.steps:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    save(step, micro, last)
    if accelerator.is_main_process:
        print(f"saved {last} (loads on one process with from_pretrained)")


if __name__ == "__main__":
    main()
