#!/usr/bin/env python3
"""Greedy answers of SGLang's own server under several attention backends, beside transformers'.

The first real run answered "What is the capital of France?" with nonsense on a fresh prompt (a
full prefill) under ``--attention-backend triton``, in SGLang's own server and in the iChat worker
alike, and correctly once the prompt's prefix was cached. This starts one ``sglang.launch_server``
per backend at once, asks each the same questions on fresh prompts, and prints them beside
transformers' greedy answer (the reference): which backend answers as the model does.

    python3 scripts/sglang_gpu/answers.py --model /root/smol --backends triton torch_native flashinfer
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Server, http, say  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three primary colors."]
PROMPT = "The capital of France is"


def reference(model: str) -> dict[str, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda()
    out = {}
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt")
        ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).cuda()
        gen = lm.generate(ids, max_new_tokens=24, do_sample=False)
        out[q] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    ids = tok(PROMPT, return_tensors="pt").input_ids.cuda()
    out[PROMPT] = tok.decode(lm.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:])
    del lm
    torch.cuda.empty_cache()
    return out


def ask(port: int) -> dict[str, str]:
    got = {}
    for q in QUESTIONS:
        status, raw = http("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                           {"model": "smol", "messages": [{"role": "user", "content": q}], "temperature": 0,
                            "max_tokens": 24}, timeout=60)  # fmt: skip
        got[q] = json.loads(raw)["choices"][0]["message"]["content"] if status == 200 else f"{status} {raw[:200]!r}"
    status, raw = http("POST", f"http://127.0.0.1:{port}/v1/completions",
                       {"model": "smol", "prompt": PROMPT, "temperature": 0, "max_tokens": 24}, timeout=60)  # fmt: skip
    got[PROMPT] = json.loads(raw)["choices"][0]["text"] if status == 200 else f"{status} {raw[:200]!r}"
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="/root/smol")
    parser.add_argument("--backends", nargs="+", default=["triton", "torch_native", "flashinfer"])
    parser.add_argument("--variants", nargs="*", default=[], metavar="NAME=FLAGS",
                        help="more servers: triton attention plus these SGLang flags, e.g. 'fp32=--dtype float32'")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers' answers")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sglang-answers"))
    parser.add_argument("--deadline", type=float, default=time.time() + 540)
    ns = parser.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    results = {} if ns.no_reference else {"transformers": reference(ns.model)}
    say("transformers:", results.get("transformers"))
    runs = [(b, ["--attention-backend", b]) for b in ns.backends]
    runs += [(v.split("=", 1)[0], ["--attention-backend", "triton", *v.split("=", 1)[1].split()]) for v in ns.variants]
    servers = {}
    for i, (name, flags) in enumerate(runs):
        port = 31000 + i
        argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", ns.model, "--served-model-name", "smol",
                "--host", "127.0.0.1", "--port", str(port), "--mem-fraction-static", "0.12", "--context-length", "2048",
                "--max-total-tokens", "100000", "--sampling-backend", "pytorch", *flags]  # fmt: skip
        servers[name] = (Server(f"sglang-{name}", argv, ns.out / f"answers-{name}.log"), port)
    pending = dict(servers)
    try:
        while pending and time.time() < ns.deadline - 30:
            for backend, (server, port) in list(pending.items()):
                if not server.alive():
                    results[backend] = {"error": f"exited {server.proc.returncode}"}
                    del pending[backend]
                elif http("GET", f"http://127.0.0.1:{port}/v1/models", timeout=5)[0] == 200:
                    try:
                        results[backend] = ask(port)
                    except (ValueError, KeyError) as exc:
                        results[backend] = {"error": repr(exc)}
                    say(backend, results[backend])
                    del pending[backend]
            time.sleep(2)
        for backend in pending:
            results[backend] = {"error": "not ready before the deadline"}
    finally:
        for server, _ in servers.values():
            say(server.stop(30))
    (ns.out / "answers.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    for name, got in results.items():  # noqa: B007
        print(f"{name:14s} " + " | ".join(repr(got.get(q, got.get("error")))[:70] for q in [*QUESTIONS, PROMPT]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
