#!/usr/bin/env python3
"""Side by side on one GPU: SGLang's own server vs the iChat gateway in front of a managed
``backend: sglang`` worker (and that worker measured directly, to place the gateway's share).

All servers are up at the same time on the one GPU, with the same model, engine flags and backends;
batches of ``vllm bench serve`` (its own code: ``vllm.benchmarks.serve.main``, called as the CLI
subcommand calls it, in this process so each batch skips the client's ~10 s import) alternate
between them in rotating order, each batch with its own ``--seed`` (fresh random prompts, no
prefix-cache carry-over). Engines measured one after another differ by ~30 % on these machines;
medians of alternating batches do not.

  (a) sglang   python3 -m sglang.launch_server ...                                   :30000
  (g) gateway  python3 -m ichat.gateway, one managed worker (backend: sglang,
               vLLM-named flags: gpu_memory_utilization, max_model_len)              :4000
  (w) worker   that managed worker, directly                                         :8002

Workload: random dataset, 512 input / 128 output tokens, --ignore-eos; concurrency 1 x 32 prompts
and concurrency 64 x 512 prompts. Writes results.json and prints a table (medians, ratios to (a)).

    python3 scripts/sglang_gpu/bench.py --model /root/smol --out "$OUT" --deadline EPOCH
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

NAME = "smol"
PORTS = {"sglang": 30000, "gateway": 4000, "worker": 8002}
#: The same engine settings for every server: SGLang names for (a), vLLM names (plus SGLang-only
#: backend choices) for the managed worker. triton attention and pytorch sampling need neither
#: FlashAttention 3 (left out of the trimmed kernel) nor FlashInfer's just-in-time kernels.
MEM_FRACTION = "0.3"
CONTEXT = "2048"
MAX_TOTAL_TOKENS = "200000"  # one KV pool size for both, whatever each one finds free at start
BACKENDS = {"attention_backend": "triton", "sampling_backend": "pytorch"}
WORKLOADS = {"c1": (1, 32), "c64": (64, 512)}
#: vLLM's Python files for the client (install_on_device.sh), kept off the servers' import path.
VLLM_BENCH_DIR = os.environ.get("VLLM_BENCH_DIR", "/tmp/vllm-bench")

GATEWAY_YAML = """\
# Written by scripts/sglang_gpu/bench.py: the gateway with one managed SGLang worker on GPU 0.
server_settings:
  host: 127.0.0.1
  port: {gateway_port}
  log_level: warning
managed_workers:
  - model_name: {name}
    model_path: {model}
    backend: sglang
    gpu_ids: [0]
    port: {worker_port}
    heartbeat_interval: 3
    # engine flags, vLLM's names: translated to --mem-fraction-static and --context-length
    gpu_memory_utilization: {mem}
    max_model_len: {context}
    backend_args:  # SGLang-only flags, passed through
      attention_backend: {attention_backend}
      sampling_backend: {sampling_backend}
      max_total_tokens: {max_total_tokens}
routing:
  policy: least_inflight
"""


def say(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def http(method: str, url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


class Server:
    """A server process in its own session (stopped by its process group, by PID), logging to a file."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.log = name, log
        say("start", name, " ".join(argv))
        self.proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> str:
        if not self.alive():
            return f"{self.name} had exited ({self.proc.returncode})"
        started = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
            return f"{self.name} stopped on SIGTERM in {time.monotonic() - started:.1f}s (exit {self.proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            return f"{self.name} still running {timeout:.0f}s after SIGTERM: killed"


def answers(port: int) -> bool:
    status, body = http(
        "POST",
        f"http://127.0.0.1:{port}/v1/completions",
        {"model": NAME, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0},
        timeout=20,
    )
    return status == 200


def wait_all(servers: dict[str, tuple[Server, int]], deadline: float) -> dict[str, float]:
    started, ready = time.monotonic(), {}
    while len(ready) < len(servers):
        for name, (server, port) in servers.items():
            if name in ready:
                continue
            if not server.alive():
                raise RuntimeError(f"{name} exited ({server.proc.returncode}); see {server.log}")
            if answers(port):
                ready[name] = time.monotonic() - started
                say(f"{name} ready in {ready[name]:.0f}s")
        if time.time() > deadline:
            raise RuntimeError(f"not ready before the deadline: {sorted(set(servers) - set(ready))}")
        time.sleep(2)
    return ready


def greedy_answers(port: int) -> dict[str, str]:
    """The same greedy questions to each server, fresh (no cached prefix), before any load."""
    got = {}
    for label, path, body in (
        ("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "What is the capital of France?"}]}),
        ("chat-2", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Name three primary colors."}]}),
        ("completion", "/v1/completions", {"prompt": "The capital of France is"}),
    ):
        status, raw = http("POST", f"http://127.0.0.1:{port}{path}",
                           {"model": NAME, "temperature": 0, "max_tokens": 24, **body}, timeout=60)  # fmt: skip
        try:
            choice = json.loads(raw)["choices"][0]
            got[label] = f"{status} " + (choice.get("message", {}).get("content") or choice.get("text") or "")
        except (ValueError, KeyError, IndexError):
            got[label] = f"{status} {raw[:200]!r}"
    return got


def bench(model: str, port: int, concurrency: int, prompts: int, seed: int, label: str) -> dict[str, Any]:
    """One batch of `vllm bench serve` (vllm.benchmarks.serve, as its CLI subcommand runs it)."""
    if VLLM_BENCH_DIR not in sys.path:  # the client only: the servers were started without it
        sys.path.insert(0, VLLM_BENCH_DIR)
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(
        [
            "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
            "--model", model, "--served-model-name", NAME, "--tokenizer", model,
            "--dataset-name", "random", "--random-input-len", "512", "--random-output-len", "128",
            "--ignore-eos", "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--seed", str(seed), "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--label", label,
        ]
    )  # fmt: skip
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        result = main(args)
    keep = (
        "completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
        "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
        "mean_itl_ms", "median_itl_ms",
    )  # fmt: skip
    out: dict[str, Any] = {k: None if result.get(k) is None else float(result[k]) for k in keep}  # numpy -> JSON
    out["completed"], out["failed"] = int(out["completed"] or 0), int(out["failed"] or 0)
    out.update(target=label, concurrency=concurrency, prompts=prompts, seed=seed)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for wl, (conc, prompts) in WORKLOADS.items():
        batches = {t: [r for r in rows if r["target"] == t and r["concurrency"] == conc] for t in PORTS}
        base = batches["sglang"]
        if not base:
            continue
        base_tok = statistics.median(r["output_throughput"] for r in base)
        base_ttft = statistics.median(r["median_ttft_ms"] for r in base)
        lines.append(f"concurrency {conc} x {prompts} prompts (medians of {len(base)} alternating batches)")
        lines.append(f"  {'target':8s} {'batches':>7s} {'failed':>6s} {'out tok/s':>10s} {'x sglang':>8s} "
                     f"{'TTFT p50 ms':>11s} {'d ms':>7s} {'TPOT p50 ms':>11s} {'req/s':>7s}  per-batch tok/s")  # fmt: skip
        for target, got in batches.items():
            if not got:
                continue
            tok = statistics.median(r["output_throughput"] for r in got)
            ttft = statistics.median(r["median_ttft_ms"] for r in got)
            tpot = statistics.median(r["median_tpot_ms"] for r in got)
            rps = statistics.median(r["request_throughput"] for r in got)
            failed = sum(r["failed"] or 0 for r in got) + sum(prompts - (r["completed"] or 0) for r in got)
            each = " ".join(f"{r['output_throughput']:.0f}" for r in got)
            lines.append(f"  {target:8s} {len(got):7d} {failed:6d} {tok:10.0f} {tok / base_tok:8.3f} "
                         f"{ttft:11.2f} {ttft - base_ttft:+7.2f} {tpot:11.3f} {rps:7.2f}  {each}")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="/root/smol")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/sglang-bench")))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--deadline", type=float, default=time.time() + 570, help="epoch seconds: stop by then")
    ns = parser.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    state = Path("/root/sglang-bench")
    state.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    flags = ["--mem-fraction-static", MEM_FRACTION, "--context-length", CONTEXT, "--max-total-tokens", MAX_TOTAL_TOKENS,
             "--attention-backend", BACKENDS["attention_backend"], "--sampling-backend", BACKENDS["sampling_backend"]]  # fmt: skip
    sglang_argv = [py, "-m", "sglang.launch_server", "--model-path", ns.model, "--served-model-name", NAME,
                   "--host", "127.0.0.1", "--port", str(PORTS["sglang"]), "--enable-metrics", *flags]  # fmt: skip
    cfg = state / "gateway.yaml"
    cfg.write_text(GATEWAY_YAML.format(gateway_port=PORTS["gateway"], name=NAME, model=ns.model,
                                       worker_port=PORTS["worker"], mem=MEM_FRACTION, context=CONTEXT,
                                       max_total_tokens=MAX_TOTAL_TOKENS, **BACKENDS))  # fmt: skip
    (ns.out / "gateway.yaml").write_text(cfg.read_text())
    servers = {
        "sglang": Server("sglang", sglang_argv, ns.out / "sglang-server.log"),
        "gateway": Server("gateway", [py, "-m", "ichat.gateway", "--config", str(cfg)], ns.out / "gateway.log"),
    }
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"flags": flags, "gateway_yaml": cfg.read_text()}
    try:
        summary["ready_s"] = wait_all(
            {"sglang": (servers["sglang"], PORTS["sglang"]), "gateway": (servers["gateway"], PORTS["gateway"])},
            ns.deadline - 120,
        )
        summary["answers"] = {t: greedy_answers(PORTS[t]) for t in PORTS}
        for target, got in summary["answers"].items():
            say(f"{target:8s} greedy answers: {got}")
        for target in PORTS:  # warm-up batch each (not counted)
            bench(ns.model, PORTS[target], 16, 64, 999, target)
        say("warmed up")
        order = list(PORTS)
        seed = 1
        per_round = 0.0
        for rnd in range(ns.rounds):
            started = time.time()
            if rnd and time.time() + per_round * 1.15 > ns.deadline - 45:
                say(f"stopping after {rnd} rounds: the next would pass the deadline")
                break
            for wl in ns.workloads:
                conc, prompts = WORKLOADS[wl]
                for target in order:
                    row = bench(ns.model, PORTS[target], conc, prompts, seed, target)
                    rows.append(row)
                    say(f"round {rnd + 1} {wl} {target:8s} seed {seed}: {row['output_throughput']:.0f} tok/s, "
                        f"TTFT p50 {row['median_ttft_ms']:.2f} ms, completed {row['completed']}/{prompts}, "
                        f"failed {row['failed']}")  # fmt: skip
                    (ns.out / "results.json").write_text(json.dumps({"rows": rows, **summary}, indent=1))
                seed += 1
            order = order[1:] + order[:1]
            per_round = time.time() - started
    finally:
        for server in servers.values():
            say(server.stop())
        summary["rows"] = rows
        (ns.out / "results.json").write_text(json.dumps(summary, indent=1))
        print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
