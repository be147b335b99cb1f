#!/usr/bin/env bash
# Expert parallelism on one multi-GPU machine (NCCL), in one go: equivalence with one process (fp32 and bf16), the
# scaling benchmark at P = 1, 2 (, 4) for MoE layers and for the whole model, and transformers' native EP on the same
# model when its wheels were carried in $PEER_WHEELS (default .whl; transformers >= 5.21). Every step has its own time
# limit, so one failure costs only its own step. Usage (repository root): bash benchmarks/gpu_ep.sh. Each suite also
# writes its rows to benchmarks/results/<suite>-<UTC time>.jsonl.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -8
python3 -c 'import torch, transformers, accelerate; print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__)'
LOG=${OUT:-/tmp}/gpu_ep_full.log
run() {  # run LIMIT CMD...: full output to $LOG, the result lines (or the error) to stdout
  local limit=$1; shift; timeout "$limit" "$@" >/tmp/step.log 2>&1; local rc=$?
  { echo "### $*"; cat /tmp/step.log; } >>"$LOG"
  grep -E "^(P=|EQUIV|RESULT|results: |layers |model |memory |host |transformers EP)" /tmp/step.log
  [ "$rc" -ne 0 ] && { echo "!! rc=$rc: $*"; grep -E "Error|error" /tmp/step.log | tail -4; }
  return 0
}
TORCHRUN="python3 -m torch.distributed.run --standalone --nproc_per_node"
echo "== equivalence with one process over NCCL, P=$GPUS"
run 120 $TORCHRUN "$GPUS" -m benchmarks ep-equivalence
for MODE in layers model; do
  echo "== scaling, $MODE, 8192 tokens/GPU, bf16"
  run 90 python3 -m benchmarks ep-scaling --mode "$MODE"
  for P in 2 4; do
    [ "$P" -le "$GPUS" ] && run 120 $TORCHRUN "$P" -m benchmarks ep-scaling --mode "$MODE"
  done
done
PEER_WHEELS=${PEER_WHEELS:-.whl}
if ls "$PEER_WHEELS"/*.whl >/dev/null 2>&1; then
  echo "== transformers native EP (peer), same model"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$PEER_WHEELS"/*.whl
  PEER="env PYTHONPATH=/tmp/site:$PYTHONPATH"
  run 120 $PEER python3 -m benchmarks ep-peer build /tmp/peer_model
  run 90 $PEER python3 -m benchmarks ep-peer run /tmp/peer_model
  for P in 2 4; do
    [ "$P" -le "$GPUS" ] && run 120 $PEER $TORCHRUN "$P" -m benchmarks ep-peer run /tmp/peer_model
  done
fi
