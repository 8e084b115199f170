"""Check the SGLang backend end to end on a CUDA machine (SGLang has no CPU build, so CI cannot).

One command, from the repository root of a CUDA machine with network access:

    python -m venv .venv-sglang && .venv-sglang/bin/pip install "sglang[all]==0.5.16" -e . \\
        && .venv-sglang/bin/python scripts/check_sglang_gpu.py

(On a machine without network, such as the lent GPU machine, ``scripts/sglang_gpu/`` carries
SGLang there in pieces and ``scripts/sglang_gpu/run.sh install check`` runs this script.)

It starts ``python -m ichat.worker --backend sglang`` with vLLM-named flags (so the translation
table is exercised too), waits for ``/health``, then checks a greedy chat answer ("Paris"), a
stream ending in ``[DONE]``, a completion, ``/v1/models``, SGLang's metrics in ``/metrics`` and an
OpenAI-shaped 400, and stops the worker with SIGTERM. Prints one line per check; exit 0 when all pass.
Flags this script does not know go to the worker (``--attention-backend triton``).
``--url`` checks a worker that is already running instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def http(method: str, url: str, body: Any = None, timeout: float = 120.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def expect(condition: object, detail: Any) -> None:
    if not condition:
        raise AssertionError(detail)


def wait_healthy(base: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode} before it was ready (its log is above)")
        try:
            if http("GET", f"{base}/health", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"/health not 200 after {timeout:.0f}s")


def checks(base: str, name: str) -> list[tuple[str, Callable[[], str]]]:
    def chat() -> str:
        status, body = http(
            "POST",
            f"{base}/v1/chat/completions",
            {"model": name, "messages": QUESTION, "temperature": 0, "max_tokens": 32},
        )
        answer = json.loads(body)["choices"][0]["message"]["content"]
        expect(status == 200 and "Paris" in answer, (status, body[:300]))
        return answer

    def stream() -> str:
        status, body = http(
            "POST",
            f"{base}/v1/chat/completions",
            {"model": name, "messages": QUESTION, "temperature": 0, "max_tokens": 32, "stream": True},
        )
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        text = "".join(
            json.loads(e)["choices"][0]["delta"].get("content") or ""
            for e in events[:-1]
            if json.loads(e).get("choices")
        )
        expect(status == 200 and events[-1] == "[DONE]" and "Paris" in text, (status, body[-300:]))
        return f"{len(events)} events: {text!r}"

    def completion() -> str:
        status, body = http(
            "POST",
            f"{base}/v1/completions",
            {"model": name, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 8},
        )
        text = json.loads(body)["choices"][0]["text"]
        expect(status == 200 and text.strip(), (status, body[:300]))
        return repr(text)

    def models() -> str:
        status, body = http("GET", f"{base}/v1/models")
        ids = [m["id"] for m in json.loads(body)["data"]]
        expect(status == 200 and ids[0] == name, (status, body[:300]))
        return ", ".join(ids)

    def metrics() -> str:
        status, body = http("GET", f"{base}/metrics")
        names = sorted(
            {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines() if line.startswith("sglang:")}
        )
        expect(status == 200 and names, "no sglang: metrics")
        return f"{len(names)} sglang metrics"

    def bad_request() -> str:
        status, body = http("POST", f"{base}/v1/chat/completions", {"model": name})
        error = json.loads(body)["error"]
        expect(status == 400 and error["message"], (status, body[:300]))
        return error["message"][:80]

    return [
        ("chat", chat),
        ("stream", stream),
        ("completion", completion),
        ("models", models),
        ("metrics", metrics),
        ("400", bad_request),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--name", default="smol", help="served model name")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--url", help="check this running worker instead of starting one")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the engine")
    ns, extra = parser.parse_known_args()

    proc = None
    base = (ns.url or f"http://127.0.0.1:{ns.port}").rstrip("/")
    if not ns.url:
        cmd = [
            sys.executable, "-m", "ichat.worker", "--backend", "sglang", "--model", ns.model,
            "--served-model-name", ns.name, "--port", str(ns.port),
            "--gpu-memory-utilization", "0.5", "--max-model-len", "2048", "--enable-prefix-caching", *extra,
        ]  # fmt: skip
        print("starting:", " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, start_new_session=True)
    failed = 0
    try:
        started = time.monotonic()
        wait_healthy(base, proc, ns.timeout)
        print(f"ok    ready in {time.monotonic() - started:.0f}s", flush=True)
        for label, check in checks(base, ns.name):
            try:
                print(f"ok    {label}: {check()}", flush=True)
            except Exception as exc:  # report every check, then fail
                failed += 1
                print(f"FAIL  {label}: {exc!r}", flush=True)
    except RuntimeError as exc:
        failed += 1
        print(f"FAIL  start: {exc}", flush=True)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
                print(f"ok    stopped on SIGTERM (exit {proc.returncode})", flush=True)
            except subprocess.TimeoutExpired:
                failed += 1
                print("FAIL  still running 90s after SIGTERM: killing its process group", flush=True)
                os.killpg(proc.pid, signal.SIGKILL)
    print("PASS" if not failed else f"{failed} check(s) failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
