#!/usr/bin/env bash
# Device-side driver for the SGLang run on the lent GPU machine (see README, "SGLang backend").
# Runs from the root of a checkout there. Stages, in order, any number per call:
#   piece FILE   move one carried bundle piece (make_bundle.sh's pNN) to /root/parts
#   install      install_on_device.sh: SGLang 0.5.16 + deps into /tmp/site, /root/smol
#   check        scripts/check_sglang_gpu.py against a real iChat worker (--backend sglang)
#   bench        scripts/sglang_gpu/bench.py: SGLang's server vs gateway -> iChat worker, side by side
# e.g.  bash scripts/sglang_gpu/run.sh piece .sgl/p04 install check     then   ... run.sh bench
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
deadline=$((start + ${GPU_RUN_BUDGET_S:-570}))
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Keep NVLink multicast off (the lending machine's rule), also for every process started from here.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-/tmp/sglang-out}
mkdir -p "$out"
# The flags both servers get, besides the model's: no FlashAttention 3, no FlashInfer JIT kernels.
backends=(--attention-backend triton --sampling-backend pytorch)
# The greedy check also computes the LM head in fp32: SmolLM2-135M (dequantized from Q4_1) has a
# near-tie for the first answer token of "What is the capital of France?" that a bf16 LM head
# resolves to "L'Étoile, ..." in SGLang 0.5.16 under every attention backend (triton,
# torch_native, flashinfer; in SGLang's own server too), and an fp32 one to "The capital of France
# is Paris.", as transformers does (scripts/sglang_gpu/answers.py shows it).
check_flags=(--enable-fp32-lm-head)

while [ $# -gt 0 ]; do
  case "$1" in
    piece) mkdir -p /root/parts && mv "$2" /root/parts/ && ls -la /root/parts; shift 2 ;;
    install)
      t0=$(date +%s)
      bash scripts/sglang_gpu/install_on_device.sh 2>&1 | tee "$out/install.log"
      echo "install took $(( $(date +%s) - t0 ))s"; shift ;;
    check)
      t0=$(date +%s)
      python3 scripts/check_sglang_gpu.py --model /root/smol --timeout 420 "${backends[@]}" "${check_flags[@]}" 2>&1 \
        | tee "$out/check.log"
      echo "check took $(( $(date +%s) - t0 ))s"; shift ;;
    bench)
      python3 scripts/sglang_gpu/bench.py --model /root/smol --out "$out" --deadline "$deadline" 2>&1 \
        | tee "$out/bench.log"
      shift ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
done
