"""Start time and first-token latency of a worker with one engine rank against one with two
pipeline stages, on the same model and flags (vLLM's CPU build, SmolLM2 by default).

    python benchmarks/distributed_start.py [--rounds 1] [--requests 5] [--json out.json]

Each round starts the 1-rank worker, measures, stops it, then the same for the 2-rank worker
(the order alternates between rounds, so that a machine busier at one moment is not charged to
one side only). Per worker: seconds from spawn to ``/health`` 200, the first streamed chat
request's time to first token (the engine's first real batch), then the median time to first
token and total time of ``--requests`` more. Both use ``--compilation-config '{"mode": 2,
"backend": "eager"}'`` (what pipeline stages need on CPU, see tests/e2e/test_distributed.py) and
each rank gets its own CPUs through ``VLLM_CPU_OMP_THREADS_BIND``. Run it with nothing else on the
machine; compare the ratio, not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMPILATION = '{"mode": 2, "backend": "eager"}'
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def omp_bind(ranks: int) -> str:
    cpus = sorted(os.sched_getaffinity(0))
    return "|".join(",".join(map(str, cpus[i::ranks] or [cpus[i % len(cpus)]])) for i in range(ranks))


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stream_chat(url: str, max_tokens: int) -> tuple[float, float, str]:
    """(time to first content token, total time, text) of one greedy streamed chat request."""
    body = json.dumps(
        {"model": "m", "messages": QUESTION, "temperature": 0, "max_tokens": max_tokens, "stream": True}
    ).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    first = None
    text = []
    with urllib.request.urlopen(request, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                if first is None:
                    first = time.perf_counter() - started
                text.append(delta)
    return first if first is not None else float("nan"), time.perf_counter() - started, "".join(text)


def measure(model: str, ranks: int, requests: int, max_tokens: int, log_dir: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    pp = ["--pipeline-parallel-size", str(ranks)] if ranks > 1 else []
    argv = [
        sys.executable, "-m", "ichat.worker", "--model", model, "--served-model-name", "m", "--port", str(port),
        "--max-model-len", "1024", "--compilation-config", COMPILATION, *pp,
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": omp_bind(ranks), "HF_HUB_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log = open(log_dir / f"worker-{ranks}.log", "wb")
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        while not healthy(url):
            if proc.poll() is not None:
                raise SystemExit(f"the {ranks}-rank worker exited with {proc.returncode}; see {log.name}")
            if time.perf_counter() - started > 900:
                raise SystemExit(f"the {ranks}-rank worker was not ready within 900 s; see {log.name}")
            time.sleep(0.1)
        ready_s = time.perf_counter() - started
        first_ttft, first_total, text = stream_chat(url, max_tokens)
        runs = [stream_chat(url, max_tokens) for _ in range(requests)]
        return {
            "ranks": ranks,
            "ready_s": round(ready_s, 2),
            "first_request_ttft_s": round(first_ttft, 4),
            "first_request_total_s": round(first_total, 4),
            "median_ttft_s": round(statistics.median(r[0] for r in runs), 4),
            "median_total_s": round(statistics.median(r[1] for r in runs), 4),
            "answer": text,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        log.close()


def main() -> int:
    models = Path(os.environ.get("ICHAT_MODELS_DIR", Path.home() / ".cache" / "ichat" / "models"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(models / "smollm2-135m-instruct"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="ichat-dist-bench-") as tmp:
        for round_no in range(args.rounds):
            order = (1, 2) if round_no % 2 == 0 else (2, 1)
            for ranks in order:
                result = measure(args.model, ranks, args.requests, args.max_tokens, Path(tmp))
                result["round"] = round_no
                results.append(result)
                print(json.dumps(result), flush=True)
    by = {r: [x for x in results if x["ranks"] == r] for r in (1, 2)}
    summary = {}
    for key in ("ready_s", "first_request_ttft_s", "median_ttft_s", "median_total_s"):
        one, two = (statistics.median(x[key] for x in by[r]) for r in (1, 2))
        summary[key] = {"1_rank": one, "2_ranks": two, "ratio": round(two / one, 2) if one else None}
    print(f"{'':24}{'1 rank':>10}{'2 ranks':>10}{'ratio':>8}")
    for key, row in summary.items():
        print(f"{key:24}{row['1_rank']:>10.3f}{row['2_ranks']:>10.3f}{row['ratio']:>8}")
    same = len({x["answer"] for x in results}) == 1
    print(f"greedy answers identical across workers: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "summary": summary, "same_answer": same}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
