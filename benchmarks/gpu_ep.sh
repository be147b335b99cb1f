#!/usr/bin/env bash
# Expert parallelism on a multi-GPU machine (NCCL): the CPU test suite's equivalence tests, a bf16 check and the
# scaling benchmark. Usage (repository root): bash benchmarks/gpu_ep.sh   (writes logs under ${OUT:-/tmp})
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp}
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -8
python3 -c 'import torch, transformers, accelerate; print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__)'
echo "== equivalence tests over NCCL (fp64 on GPUs, reference on CPU)"
python3 -m pytest -q -p no:cacheprovider tests/test_expert_parallel.py 2>&1 | tee "$OUT/ep_tests.log" | tail -15
echo "== scaling (Qwen3-30B-A3B MoE layers, 8192 tokens/GPU, bf16)"
python3 benchmarks/ep_scaling.py 2>&1 | tee "$OUT/ep_scaling.log" | grep "P="
for P in 2 4; do
  [ "$P" -le "$GPUS" ] && torchrun --standalone --nproc_per_node "$P" benchmarks/ep_scaling.py 2>&1 | tee -a "$OUT/ep_scaling.log" | grep "P="
done
