#!/usr/bin/env bash
# Create .venv-sglang-args: SGLang's real argument parsers, nothing more, for
# tests/worker/test_sglang_parser.py (the vLLM -> SGLang flag translation is checked against them).
#
# The plugin supports SGLang 0.5.16 through 0.5.23, so the oldest and the newest are installed:
# one venv with the shared dependencies, and each SGLang version, without its dependencies, in its
# own folder (.venv-sglang-args/sglang-VERSION, put first on PYTHONPATH by the tests). A second
# version costs one 15-40 MB wheel, not a second venv.
#
# SGLang cannot run on a CPU-only machine (no CPU build on PyPI) and must not go into .venv: its
# torch pin would replace vLLM's. So sglang is installed with --no-deps, beside exactly what
# importing sglang.srt.server_args needs (found by importing until nothing was missing, for both
# versions): torch (the CPU wheel, 2.13.0+cpu, lies on these machines' disk) and triton
# (sglang.srt.utils.common imports both at module level), plus the packages below. attrs and
# orjson are for iChat's own modules, which the probe imports from the checkout. 0.5.16 also
# imports torchvision at module level, for which no CPU build exists: the probe
# (tests/worker/sglang_parser_probe.py) puts a stand-in in its place.
# Idempotent: a stamp records what was installed; a second run is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SGLANG_ARGS_VENV:-.venv-sglang-args}
python=${PYTHON:-python3}
read -r -a versions <<< "${SGLANG_VERSIONS:-0.5.16 0.5.23}"
torch_req=${SGLANG_ARGS_TORCH:-torch==2.13.0+cpu}
deps=(numpy orjson psutil pybase64 requests packaging pillow starlette msgspec pydantic pyzmq tqdm ipython aiohttp triton attrs
  # SGLang 0.5.16's server_args also imports its model configs (transformers, at its pin) and
  # tokenizer/grammar helpers; 0.5.23 imports these lazily.
  transformers==5.12.1 dill openai partial_json_parser xgrammar sentencepiece
  # and, where no accelerator is found (CI), its CPU path through the model and quantization configs
  einops compressed_tensors gguf)

stamp="$venv/.ichat-sglang-args"
want="$(sha256sum "$0" | cut -c1-16)-${versions[*]}-$torch_req"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

start=$(date +%s)
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
quiet() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
echo "setup: installing the argument parsers of SGLang ${versions[*]} into $venv"
if ! "${pip[@]}" "$torch_req" 2> >(quiet); then
  # Elsewhere than these machines: any torch imports for parsing (PyPI's is the CUDA build, larger).
  echo "setup: $torch_req not found; installing torch from the index" >&2
  "${pip[@]}" torch 2> >(quiet)
fi
"${pip[@]}" "${deps[@]}" 2> >(quiet)
for v in "${versions[@]}"; do
  target="$venv/sglang-$v"
  rm -rf "$target"
  # Without its dependencies (CUDA kernels, a torch pin): the venv above holds what parsing needs.
  "${pip[@]}" --no-deps --target "$target" "sglang==$v" 2> >(quiet)
  [ -d "$target/sglang-$v.dist-info" ] || { echo "setup: sglang $v did not install into $target" >&2; exit 1; }
done
echo "$want" > "$stamp"
echo "setup: SGLang parser venv ready in $(( $(date +%s) - start ))s"
