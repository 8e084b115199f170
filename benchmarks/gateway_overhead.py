"""What the iChat gateway adds on top of a direct call, next to the Rust SGLang router.

    python benchmarks/gateway_overhead.py [--duration 5] [--warmup 1] [--no-router]
    make bench

In one run, on 127.0.0.1 only, against one fast fake OpenAI upstream
(``benchmarks/fake_upstream.py``, raw asyncio on uvloop), it measures three targets:

* ``direct``: the load generator talks to the fake upstream itself;
* ``sglang-router``: through ``python -m sglang_router.launch_router`` (installed into its own
  venv, ``benchmarks/.venv-router``, on first use; ``--no-router`` skips it);
* ``ichat``: through ``python -m ichat.gateway`` with its full feature set on: a static route,
  the ``least_inflight`` policy, auth with a key (the load generator sends it), metrics.

and four cells, each a bounded closed-loop run (warm-up first) of ``benchmarks/loadgen.py`` in
its own process: non-streaming latency at concurrency 1, non-streaming requests/s at
concurrency 32, streamed responses/s (64 SSE events each) and time to first chunk at
concurrency 32, and time to first chunk at concurrency 1. It prints one table and the ratios
the gateway issue sets as targets. All processes share the machine's cores; nothing is pinned,
so run it on an otherwise idle machine and compare ratios from one run, not absolute numbers
across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from array import array
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling scripts, which are not a package

from loadgen import percentile, read_samples  # noqa: E402
ROUTER_VENV = HERE / ".venv-router"
ROUTER_PACKAGE = "sglang-router"
KEY = "bench-key"
MODEL = "bench"
CHUNKS = 64

#: (cell name, loadgen mode, concurrency)
CELLS = (
    ("json_c1", "json", 1),
    ("json_c32", "json", 32),
    ("stream_c32", "stream", 32),
    ("stream_c1", "stream", 1),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")
        time.sleep(0.2)


def post_once(url: str) -> None:
    """One real request through a target, so a misconfigured one fails loudly up front."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        answer = json.loads(resp.read())
    if answer.get("object") != "chat.completion":
        raise RuntimeError(f"{url} answered {answer!r}")


@contextlib.contextmanager
def process(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def router_python(install: bool) -> tuple[Path | None, str]:
    """The router venv's python, creating the venv on first use; (None, why) when impossible."""
    python = ROUTER_VENV / "bin" / "python"
    if python.exists():
        probe = subprocess.run([str(python), "-c", "import sglang_router"], capture_output=True)
        if probe.returncode == 0:
            return python, "installed"
    if not install:
        return None, f"not installed in {ROUTER_VENV} (run without --no-router-install)"
    print(f"installing {ROUTER_PACKAGE} into {ROUTER_VENV} (first run only) ...", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(ROUTER_VENV)],
        [str(python), "-m", "pip", "install", "-q", ROUTER_PACKAGE],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, f"install failed: {' | '.join(tail)}"
    return python, "installed now"


def loadgen(url: str, mode: str, concurrency: int, duration: float, warmup: float, samples: Path) -> dict:
    argv = [
        sys.executable, str(HERE / "loadgen.py"), "--url", url, "--mode", mode,
        "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup),
        "--key", KEY, "--model", MODEL, "--samples", str(samples),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 60)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen against {url} failed:\n{done.stderr}")
    return json.loads(done.stdout)


class Cell:
    """One cell's runs against one target, merged over rounds."""

    def __init__(self) -> None:
        self.latency: array = array("d")
        self.ttfc: array = array("d")
        self.completed = 0
        self.elapsed = 0.0

    def add(self, result: dict, samples: Path) -> None:
        latency, ttfc = read_samples(str(samples))
        self.latency.extend(latency)
        self.ttfc.extend(ttfc)
        self.completed += result["completed"]
        self.elapsed += result["elapsed"]

    def summary(self) -> dict:
        return {
            "completed": self.completed,
            "rps": self.completed / self.elapsed,
            "p50_ms": percentile(self.latency, 0.50),
            "p99_ms": percentile(self.latency, 0.99),
            "ttfc_p50_ms": percentile(self.ttfc, 0.50),
            "ttfc_p99_ms": percentile(self.ttfc, 0.99),
        }


def gateway_config(path: Path, upstream: str, port: int) -> None:
    # JSON is YAML: the gateway's loader reads it as is.
    config = {
        "server_settings": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "routes": [{"model_name": MODEL, "api_base": upstream + "/v1"}],
        "routing": {"policy": "least_inflight"},
        "auth": {"api_keys": [KEY]},
    }
    path.write_text(json.dumps(config, indent=2))


def check(result: dict, target: str, cell: str, expected_sizes: set[int]) -> None:
    if result["errors"] or set(result["statuses"]) != {"200"} or not result["completed"]:
        raise RuntimeError(f"{target} {cell}: failures: {result}")
    if set(result["body_sizes"]) - expected_sizes:
        raise RuntimeError(f"{target} {cell}: unexpected body sizes {result['body_sizes']}")


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.{digits}f}"


def report(results: dict[str, dict[str, dict]], targets: list[str]) -> bool:
    def get(target: str, cell: str, key: str) -> float | None:
        return results.get(target, {}).get(cell, {}).get(key)

    def added(target: str, cell: str, key: str) -> float | None:
        value, base = get(target, cell, key), get("direct", cell, key)
        return None if value is None or base is None or target == "direct" else value - base

    rows = [
        ("c=1   latency p50 (ms)", lambda t: get(t, "json_c1", "p50_ms")),
        ("c=1   latency p99 (ms)", lambda t: get(t, "json_c1", "p99_ms")),
        ("c=1   added p50 (ms)", lambda t: added(t, "json_c1", "p50_ms")),
        ("c=1   added p99 (ms)", lambda t: added(t, "json_c1", "p99_ms")),
        ("c=32  requests/s", lambda t: get(t, "json_c32", "rps")),
        ("c=32  latency p50 (ms)", lambda t: get(t, "json_c32", "p50_ms")),
        ("c=32  streamed responses/s", lambda t: get(t, "stream_c32", "rps")),
        ("c=32  stream TTFC p50 (ms)", lambda t: get(t, "stream_c32", "ttfc_p50_ms")),
        ("c=32  stream TTFC p99 (ms)", lambda t: get(t, "stream_c32", "ttfc_p99_ms")),
        ("c=1   stream TTFC p50 (ms)", lambda t: get(t, "stream_c1", "ttfc_p50_ms")),
        ("c=1   stream TTFC added p50 (ms)", lambda t: added(t, "stream_c1", "ttfc_p50_ms")),
        ("c=1   stream total p50 (ms)", lambda t: get(t, "stream_c1", "p50_ms")),
    ]
    width = max(len(r[0]) for r in rows) + 2
    print()
    print("".ljust(width) + "".join(t.rjust(15) for t in targets))
    for label, value in rows:
        print(label.ljust(width) + "".join(fmt(value(t)).rjust(15) for t in targets))

    print()
    ok = True
    if "sglang-router" in results and "ichat" in results:

        def ratio(cell: str, key: str) -> float:
            return get("ichat", cell, key) / get("sglang-router", cell, key)

        gap = added("ichat", "json_c1", "p50_ms") - added("sglang-router", "json_c1", "p50_ms")
        checks = [
            ("added p50 at c=1, ichat - router", f"{gap:+.3f} ms", "<= +0.100 ms", gap <= 0.1),
            ("requests/s at c=32, ichat / router", f"{ratio('json_c32', 'rps'):.2f}x", ">= 0.80x", ratio("json_c32", "rps") >= 0.8),
            ("streams/s at c=32, ichat / router", f"{ratio('stream_c32', 'rps'):.2f}x", ">= 2.00x", ratio("stream_c32", "rps") >= 2.0),
        ]
    else:
        checks = []
    ttfc = added("ichat", "stream_c1", "ttfc_p50_ms")
    if ttfc is not None:
        checks.append(("TTFC added at c=1, ichat", f"{ttfc:.3f} ms", "<= 0.500 ms", ttfc <= 0.5))
    for label, have, want, passed in checks:
        ok &= passed
        print(f"{label:<40}{have:>12}   target {want:<14}{'ok' if passed else 'MISSED'}")
    if "ichat" in results:
        print(
            f"{'requests/s at c=32, ichat / direct':<40}"
            f"{get('ichat', 'json_c32', 'rps') / get('direct', 'json_c32', 'rps'):>11.2f}x"
        )
        print(
            f"{'streams/s at c=32, ichat / direct':<40}"
            f"{get('ichat', 'stream_c32', 'rps') / get('direct', 'stream_c32', 'rps'):>11.2f}x"
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per cell and target")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds the duration is split into")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--no-router", action="store_true", help="skip the SGLang router")
    parser.add_argument("--no-router-install", action="store_true", help="use the router only if already installed")
    parser.add_argument("--cells", default=",".join(c[0] for c in CELLS), help="comma-separated subset of cells")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    cells = [c for c in CELLS if c[0] in args.cells.split(",")]

    from fake_upstream import CHAT, sse_event

    expected = {
        "json": {len(CHAT) - CHAT.index(b"\r\n\r\n") - 4},
        "stream": {sum(len(sse_event(i)) for i in range(CHUNKS)) + len(b"data: [DONE]\n\n")},
    }

    router, router_state = (None, "skipped (--no-router)") if args.no_router else router_python(not args.no_router_install)
    print(f"sglang-router: {router_state}")

    results: dict[str, dict[str, dict]] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ichat-bench-")))
        up_port, gw_port, rt_port = free_port(), free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        up = stack.enter_context(
            process([sys.executable, str(HERE / "fake_upstream.py"), "--port", str(up_port), "--chunks", str(CHUNKS)], tmp / "upstream.log")
        )
        wait_http(upstream + "/health", 15, up)
        targets = {"direct": upstream}

        if router is not None:
            argv = [
                str(router), "-m", "sglang_router.launch_router", "--worker-urls", upstream,
                "--host", "127.0.0.1", "--port", str(rt_port), "--prometheus-port", str(free_port()),
                "--prometheus-host", "127.0.0.1", "--log-level", "warn",
            ]  # fmt: skip
            rt = stack.enter_context(process(argv, tmp / "router.log"))
            try:
                wait_http(f"http://127.0.0.1:{rt_port}/health", 60, rt)
                post_once(f"http://127.0.0.1:{rt_port}")
                targets["sglang-router"] = f"http://127.0.0.1:{rt_port}"
            except (RuntimeError, OSError) as exc:
                print(f"sglang-router: could not start ({exc}); log:\n{(tmp / 'router.log').read_text()[-2000:]}")

        config = tmp / "gateway.yaml"
        gateway_config(config, upstream, gw_port)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        gw = stack.enter_context(
            process([sys.executable, "-m", "ichat.gateway", "--config", str(config)], tmp / "gateway.log", env=env)
        )
        try:
            wait_http(f"http://127.0.0.1:{gw_port}/health", 30, gw)
            post_once(f"http://127.0.0.1:{gw_port}")
        except (RuntimeError, OSError):
            print((tmp / "gateway.log").read_text()[-3000:])
            raise
        targets["ichat"] = f"http://127.0.0.1:{gw_port}"

        samples = tmp / "samples.bin"
        names = list(targets)
        for cell, mode, concurrency in cells:
            merged = {target: Cell() for target in names}
            for round_ in range(args.rounds):
                # Rounds interleave the targets (in a rotating order), so a slow spell of the
                # machine or an unlucky placement of processes on cores hits them all alike.
                for target in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    warmup = args.warmup if round_ == 0 else min(args.warmup, 0.3)
                    result = loadgen(targets[target], mode, concurrency, args.duration / args.rounds, warmup, samples)
                    check(result, target, cell, expected[mode])
                    merged[target].add(result, samples)
            for target in names:
                result = results.setdefault(target, {})[cell] = merged[target].summary()
                print(
                    f"  {cell:<11} {target:<14}{result['rps']:>10,.0f}/s  p50 {result['p50_ms']:.3f} ms"
                    f"  ttfc p50 {result['ttfc_p50_ms']:.3f} ms"
                )

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    ok = report(results, list(targets))
    print(f"\n(cores: {os.cpu_count()}; per cell and target {args.duration:g} s measured in {args.rounds} interleaved rounds, after {args.warmup:g} s warm-up)")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
