#!/usr/bin/env bash
# Create .venv-sglang-args: SGLang's real argument parser, nothing more, for
# tests/worker/test_sglang_parser.py (the vLLM -> SGLang flag translation is checked against it).
#
# SGLang cannot run on a CPU-only machine (no CPU build on PyPI) and must not go into .venv: its
# torch pin would replace vLLM's. So sglang is installed with --no-deps, beside exactly what
# importing sglang.srt.server_args needs (found by importing until nothing was missing): torch
# (the CPU wheel, 2.13.0+cpu, lies on these machines' disk) and triton (sglang.srt.utils.common
# imports both at module level), plus the small packages below. attrs and orjson are for iChat's
# own modules, which the probe imports from the checkout.
# Idempotent: a stamp records what was installed; a second run is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SGLANG_ARGS_VENV:-.venv-sglang-args}
python=${PYTHON:-python3}
sglang_version=${SGLANG_VERSION:-0.5.23}
torch_req=${SGLANG_ARGS_TORCH:-torch==2.13.0+cpu}
deps=(numpy orjson psutil pybase64 requests packaging pillow starlette msgspec pydantic pyzmq tqdm ipython aiohttp triton attrs)

stamp="$venv/.ichat-sglang-args"
want="$(sha256sum "$0" | cut -c1-16)-$sglang_version-$torch_req"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

start=$(date +%s)
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
quiet() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
echo "setup: installing SGLang $sglang_version's argument parser into $venv"
if ! "${pip[@]}" "$torch_req" 2> >(quiet); then
  # Elsewhere than these machines: any torch imports for parsing (PyPI's is the CUDA build, larger).
  echo "setup: $torch_req not found; installing torch from the index" >&2
  "${pip[@]}" torch 2> >(quiet)
fi
"${pip[@]}" "${deps[@]}" 2> >(quiet)
# Last and without its dependencies (CUDA kernels, a torch pin): nothing after it re-checks them.
"${pip[@]}" --no-deps "sglang==$sglang_version" 2> >(quiet)
"$venv/bin/python" -c "import argparse; from sglang.srt.server_args import ServerArgs; ServerArgs.add_cli_args(argparse.ArgumentParser())"
echo "$want" > "$stamp"
echo "setup: SGLang parser venv ready in $(( $(date +%s) - start ))s"
