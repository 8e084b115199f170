#!/usr/bin/env python3
"""Side-by-side GPU benchmark: vLLM's own OpenAI server vs the iChat worker vs the iChat gateway.

Runs on the lent GPU machine (see docs/gpu-run.md; ``scripts/gpu_run.sh`` installs vLLM there):

  (a) ``python3 -m vllm.entrypoints.openai.api_server`` on :8000
  (b) ``python3 -m ichat.worker`` alone on :8001
  (c) ``python3 -m ichat.gateway`` on :4000 with one managed worker (``gpu_ids: [0]``, :8002);
      the same managed worker is also measured directly (row "c-direct") to isolate the gateway

Each is measured with vLLM's own client (``vllm.benchmarks.serve``; random dataset, 512 input /
128 output tokens, ``--ignore-eos``): concurrency 1 x 32 prompts and concurrency 64 x 512 prompts,
plus a TTFT-focused run (concurrency 1 x 128 prompts, 16 output tokens). One server at a time:
each is stopped (its process group, by PID) and the GPU seen empty before the next starts.
While (c) runs, the GPU inventory (admin API, NVML) is compared with ``nvidia-smi`` and the
managed worker's ``CUDA_VISIBLE_DEVICES`` is read from ``/proc/<pid>/environ``.

Phases can run in separate calls (results persist in --state):

  python3 scripts/gpu_bench.py a b c table --state /root/ichat-bench --out "$OUT"
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = os.environ.get("ICHAT_BENCH_MODEL", "/root/smol")
NAME = "smol"
PY = sys.executable
# Dry run of this script's mechanics on a CPU machine: ICHAT_BENCH_BACKEND=stub (phases b, c) and
# ICHAT_BENCH_SCALE=8 (prompt counts / 8). The real run leaves both unset.
BACKEND = os.environ.get("ICHAT_BENCH_BACKEND", "vllm")
SCALE = int(os.environ.get("ICHAT_BENCH_SCALE", "1"))
ENGINE_FLAGS = ["--max-model-len", "2048"] if BACKEND == "vllm" else []  # the same for (a), (b) and (c)
PORTS = {"a": 8000, "b": 8001, "c-worker": 8002, "c": 4000}

# Wall-clock end of this call (epoch seconds, --deadline): waits and benches are cut short so the
# results are packed into --out before the device tool's 10-minute limit kills the call.
DEADLINE = float("inf")


def left(reserve: float = 0.0) -> float:
    return DEADLINE - time.time() - reserve


LABELS = {
    "a": "(a) vLLM api_server",
    "b": "(b) iChat worker",
    "c": "(c) iChat gateway -> managed worker",
    "c-direct": "(c') managed worker, direct",
}

# name: (num_prompts, max_concurrency, output_len, warmups)
CONFIGS = {
    "c1": (32, 1, 128, 8),
    "c64": (512, 64, 128, 64),
    "ttft": (128, 1, 16, 8),
    "ab": (64, 1, 16, 2),  # phase ab: A/B batches, gateway vs direct
    "ab64": (512, 64, 128, 64),
}

BENCH_CHILD = r"""
import json, sys, traceback
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
for run in json.loads(sys.argv[1]):
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(run["argv"])
    print(f"===== bench {run['name']}: {' '.join(run['argv'])}", flush=True)
    try:
        main(args)
    except BaseException:
        traceback.print_exc()
        print(f"===== bench {run['name']} FAILED", flush=True)
    sys.stdout.flush()
"""

# Lets py-spy (a sibling, not an ancestor) read the gateway under Yama ptrace_scope=1; no other effect.
PTRACER_ANY = (
    "import ctypes, os, sys; ctypes.CDLL(None).prctl(0x59616D61, ctypes.c_ulong(-1), 0, 0, 0); "
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
)


def say(*parts: Any) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class Server:
    """A process group we started; stopped by its PID only."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115
        say(f"start {name}: {' '.join(argv)}")
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env or child_env(), stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, check: Any, timeout: float) -> float:
        timeout = min(timeout, left(reserve=150.0) + (time.monotonic() - self.started))  # leave time to bench
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if check():
                took = time.monotonic() - self.started
                say(f"{self.name} ready after {took:.1f}s")
                return took
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        self.log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            say(f"stop {self.name} (pgid {self.pid})")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # the engine core is in the same process group: make sure none of it is left
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.log.close()


def run_text(argv: list[str]) -> str:
    """stdout of a short command ('' when it is missing, as nvidia-smi is on a CPU machine)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def gpu_apps() -> list[str]:
    out = run_text(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"])
    return [line.strip() for line in out.splitlines() if line.strip()]


def wait_gpu_empty(timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        apps = gpu_apps()
        if not apps:
            return
        time.sleep(1.0)
    say(f"WARNING: GPU still has compute apps after {timeout:.0f}s: {apps}")


def bench(state: Path, runs: list[tuple[Any, ...]], log_name: str) -> None:
    """runs: (label, port, config[, seed, tag]); one child process imports vLLM's client once for all.

    With a tag (A/B batches) the result also keeps every request's TTFT (--save-detailed)."""
    specs, files = [], []
    for label, port, config, *rest in runs:
        seed, tag = (rest + [0, ""])[:2] if rest else (0, "")
        n, conc, out_len, warmups = CONFIGS[config]
        n, warmups = max(n // SCALE, 1), max(warmups // SCALE, 1)
        name = f"{label}-{config}{tag}"
        argv = [
            "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
            "--model", NAME, "--tokenizer", MODEL, "--dataset-name", "random",
            "--random-input-len", "512", "--random-output-len", str(out_len), "--ignore-eos",
            "--num-prompts", str(n), "--max-concurrency", str(conc), "--num-warmups", str(warmups),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--seed", str(seed), "--disable-tqdm", "--save-result", "--result-dir", str(state),
            "--result-filename", f"bench-{name}.json", "--label", name,
        ]  # fmt: skip
        if tag:
            argv.append("--save-detailed")
        specs.append({"name": name, "argv": argv})
        files.append(name)
    say(f"bench: {', '.join(s['name'] for s in specs)}")
    with open(state / log_name, "ab") as log:
        try:
            subprocess.run([PY, "-c", BENCH_CHILD, json.dumps(specs)], cwd=REPO, env=child_env(), stdout=log,
                           stderr=subprocess.STDOUT, check=False, timeout=max(30.0, min(420.0, left(reserve=40.0))))  # fmt: skip
        except subprocess.TimeoutExpired:
            say("bench cut short by the deadline")
    for name in files:
        path = state / f"bench-{name}.json"
        if path.exists():
            r = json.loads(path.read_text())
            say(
                f"  {name}: completed {r.get('completed')} failed {r.get('failed')} "
                f"ttft p50 {r.get('p50_ttft_ms', 0):.2f} ms p99 {r.get('p99_ttft_ms', 0):.2f} ms "
                f"tpot {r.get('mean_tpot_ms', 0):.3f} ms out {r.get('output_throughput', 0):.0f} tok/s"
            )
        else:
            say(f"  {name}: NO RESULT (see {log_name})")


def models_ready(port: int) -> Any:
    def check() -> bool:
        status, body = http("GET", f"http://127.0.0.1:{port}/v1/models", timeout=3)
        return status == 200 and isinstance(body, dict) and any(m.get("id") == NAME for m in body.get("data", []))

    return check


def warm_one(port: int) -> None:
    status, body = http(
        "POST", f"http://127.0.0.1:{port}/v1/completions",
        {"model": NAME, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}, timeout=60,
    )  # fmt: skip
    text = body["choices"][0]["text"] if status == 200 and isinstance(body, dict) else body
    say(f"  smoke completion on :{port}: {status} {text!r}")


def record_env(state: Path) -> None:
    info: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    code = "import json, torch, vllm; print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__, 'gpu': torch.cuda.get_device_name(0)}))"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=child_env(), check=False)
    with contextlib.suppress(ValueError, IndexError):
        info.update(json.loads(out.stdout.strip().splitlines()[-1]))
    info["nvidia_smi_L"] = run_text(["nvidia-smi", "-L"])
    info["nvidia_smi"] = run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    info["cpus"] = os.cpu_count()
    (state / "env.json").write_text(json.dumps(info, indent=2))
    say(f"env: {info}")


# -- phases ---------------------------------------------------------------------------------------


def phase_a(state: Path) -> None:
    if not (state / "env.json").exists():
        record_env(state)
    wait_gpu_empty()
    argv = [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL, "--served-model-name", NAME,
            "--host", "127.0.0.1", "--port", str(PORTS["a"]), *ENGINE_FLAGS]  # fmt: skip
    server = Server("vllm-api-server", argv, state / "a-server.log")
    try:
        took = server.wait_ready(models_ready(PORTS["a"]), timeout=420)
        (state / "a-ready.json").write_text(json.dumps({"ready_s": took}))
        warm_one(PORTS["a"])
        bench(state, [("a", PORTS["a"], c) for c in ("c1", "c64", "ttft")], "a-bench.log")
    finally:
        server.stop()
        wait_gpu_empty()


def phase_b(state: Path) -> None:
    wait_gpu_empty()
    argv = [PY, "-m", "ichat.worker", "--model", MODEL, "-n", NAME, "--host", "127.0.0.1",
            "--port", str(PORTS["b"]), "--backend", BACKEND, *ENGINE_FLAGS]  # fmt: skip
    server = Server("ichat-worker", argv, state / "b-worker.log")
    try:
        took = server.wait_ready(models_ready(PORTS["b"]), timeout=360)
        (state / "b-ready.json").write_text(json.dumps({"ready_s": took}))
        warm_one(PORTS["b"])
        bench(state, [("b", PORTS["b"], c) for c in ("c1", "c64", "ttft")], "b-bench.log")
    finally:
        server.stop()
        wait_gpu_empty()


GATEWAY_YAML = """\
# Written by scripts/gpu_bench.py: the gateway on :4000 with one managed vLLM worker on GPU 0.
server_settings:
  host: 127.0.0.1
  port: {gw_port}
  log_level: info
managed_workers:
  - model_name: {name}
    model_path: {model}
    backend: {backend}
    gpu_ids: [0]
    port: {worker_port}
    heartbeat_interval: 3
{engine_flags}routing:
  policy: least_inflight
"""


def start_gateway(state: Path, log_name: str) -> tuple[Server, float]:
    cfg = state / "gateway.yaml"
    flags = "    # engine flags in vLLM's snake_case names (the same as (a) and (b))\n    max_model_len: 2048\n"
    cfg.write_text(GATEWAY_YAML.format(gw_port=PORTS["c"], name=NAME, model=MODEL, worker_port=PORTS["c-worker"],
                                       backend=BACKEND, engine_flags=flags if BACKEND == "vllm" else ""))  # fmt: skip
    argv = [PY, "-c", PTRACER_ANY, "-m", "ichat.gateway", "--config", str(cfg)]
    gw = Server("ichat-gateway", argv, state / log_name)

    def routable() -> bool:
        status, body = http("GET", f"http://127.0.0.1:{PORTS['c']}/v1/admin/cluster/status", timeout=3)
        return status == 200 and body.get("models", {}).get(NAME, {}).get("routable", 0) >= 1

    try:
        took = gw.wait_ready(routable, timeout=420)
    except BaseException:
        gw.stop(timeout=90)
        raise
    return gw, took


def managed_worker_pid() -> int | None:
    _, workers = http("GET", f"http://127.0.0.1:{PORTS['c']}/v1/admin/workers")
    for w in (workers or {}).get("data", []) if isinstance(workers, dict) else []:
        if w.get("pid"):
            return int(w["pid"])
    return None


def stop_gateway(gw: Server, worker_pid: int | None) -> None:
    gw.stop(timeout=90)
    if worker_pid is not None and Path(f"/proc/{worker_pid}").exists():
        say(f"managed worker {worker_pid} outlived the gateway: stopping its group")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker_pid, signal.SIGKILL)
    wait_gpu_empty()


def phase_ab(state: Path, rounds: int = 12) -> None:
    """A/B of the gateway's added latency on one engine: batches through the gateway and straight to
    the managed worker alternate (order flipped every round), each batch with its own seed so no
    batch reuses another's prompts (no prefix-cache advantage for whichever runs second)."""
    wait_gpu_empty()
    gw, took = start_gateway(state, "ab-gateway.log")
    worker_pid = managed_worker_pid()
    try:
        (state / "ab-ready.json").write_text(json.dumps({"ready_s": took}))
        warm_one(PORTS["c"])
        runs: list[tuple[Any, ...]] = []
        seed = 100
        for i in range(rounds):
            pair = [("c", PORTS["c"]), ("c-direct", PORTS["c-worker"])]
            for label, port in pair if i % 2 == 0 else pair[::-1]:
                seed += 1
                runs.append((label, port, "ab", seed, f"-{i:02d}"))
        for i in range(2):
            pair = [("c", PORTS["c"]), ("c-direct", PORTS["c-worker"])]
            for label, port in pair if i % 2 == 0 else pair[::-1]:
                seed += 1
                runs.append((label, port, "ab64", seed, f"-{i:02d}"))
        bench(state, runs, "ab-bench.log")
        print(ab_summary(state), flush=True)
    finally:
        stop_gateway(gw, worker_pid)


def ab_summary(state: Path) -> str:
    import random
    import statistics

    lines = []
    for config, key in (("ab", "ttfts"), ("ab64", None)):
        per: dict[str, list[float]] = {"c": [], "c-direct": []}
        batch: dict[str, list[dict[str, Any]]] = {"c": [], "c-direct": []}
        for path in sorted(state.glob(f"bench-*-{config}-*.json")):
            r = json.loads(path.read_text())
            label = "c-direct" if "-c-direct-" in path.name else "c"
            batch[label].append(r)
            if key:
                per[label] += [1000.0 * t for t in r.get(key) or [] if t]
        if key and per["c"] and per["c-direct"]:
            med_c, med_d = statistics.median(per["c"]), statistics.median(per["c-direct"])
            rng = random.Random(0)
            boots = []
            for _ in range(2000):
                bc = [rng.choice(per["c"]) for _ in per["c"]]
                bd = [rng.choice(per["c-direct"]) for _ in per["c-direct"]]
                boots.append(statistics.median(bc) - statistics.median(bd))
            boots.sort()
            lines.append(
                f"A/B TTFT (c=1, 512 in / 16 out, {len(per['c'])} vs {len(per['c-direct'])} requests, "
                f"{len(batch['c'])} alternating batches each, fresh prompts per batch):"
            )
            for label in ("c", "c-direct"):
                xs = sorted(per[label])
                lines.append(
                    f"  {LABELS[label]:38s} median {statistics.median(xs):6.2f} ms  mean {statistics.fmean(xs):6.2f} ms  "
                    f"p90 {xs[int(0.9 * (len(xs) - 1))]:6.2f} ms  p99 {xs[int(0.99 * (len(xs) - 1))]:6.2f} ms"
                )
            lines.append(
                f"  gateway adds (median): {med_c - med_d:+.2f} ms, 95% bootstrap CI "
                f"[{boots[50]:+.2f}, {boots[1949]:+.2f}] ms; per-batch medians: "
                + ", ".join(f"{r.get('median_ttft_ms', 0):.1f}" for r in batch["c"]) + " (gateway) vs "
                + ", ".join(f"{r.get('median_ttft_ms', 0):.1f}" for r in batch["c-direct"]) + " (direct)"
            )
        elif not key and batch["c"]:
            lines.append("A/B c=64 (512 prompts, 128 out, fresh prompts per batch), output tok/s:")
            for label in ("c", "c-direct"):
                lines.append(f"  {LABELS[label]:38s} " + ", ".join(
                    f"{r.get('output_throughput', 0):.0f} (ttft p50 {r.get('median_ttft_ms', 0):.1f} ms, failed {r.get('failed')})"
                    for r in batch[label]))  # fmt: skip
    text = "\n".join(lines) + "\n"
    (state / "ab-summary.txt").write_text(text)
    return text


def phase_c(state: Path) -> None:
    wait_gpu_empty()
    gw, took = start_gateway(state, "c-gateway.log")
    worker_pid = None
    try:
        (state / "c-ready.json").write_text(json.dumps({"ready_s": took}))
        warm_one(PORTS["c"])
        worker_pid = inventory(state)
        runs = []
        for config in ("c1", "c64", "ttft"):  # interleaved: same engine, through the gateway and direct
            runs += [("c", PORTS["c"], config), ("c-direct", PORTS["c-worker"], config)]
        bench(state, runs, "c-bench.log")
        _, metrics = http("GET", f"http://127.0.0.1:{PORTS['c']}/metrics")
        (state / "c-gateway-metrics.txt").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
        if left() > 60:
            visibility_probe(state)
        profile_gateway(state, gw.pid)
    finally:
        stop_gateway(gw, worker_pid)


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError as exc:
        return {"<error>": str(exc)}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children[int(fields[1])].append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    return "?"


def inventory(state: Path) -> int | None:
    """Admin API + NVML inventory vs nvidia-smi; CUDA_VISIBLE_DEVICES of the managed worker's processes."""
    base = f"http://127.0.0.1:{PORTS['c']}"
    time.sleep(4)  # one more heartbeat (interval 3 s) so the inventory is fresh
    _, cluster = http("GET", f"{base}/v1/admin/cluster/status")
    _, workers = http("GET", f"{base}/v1/admin/workers")
    smi_l = run_text(["nvidia-smi", "-L"])
    smi_q = run_text(
        ["nvidia-smi", "--query-gpu=index,uuid,name,memory.used,memory.total,utilization.gpu", "--format=csv,noheader,nounits"]
    )
    smi = []
    for line in smi_q.splitlines():
        idx, uuid, name, used, total, util = (x.strip() for x in line.split(","))
        smi.append({"index": int(idx), "uuid": uuid, "name": name, "memory_used_mib": int(used),
                    "memory_total_mib": int(total), "utilization_pct": util})  # fmt: skip
    wlist = (workers or {}).get("data", []) if isinstance(workers, dict) else []
    report: dict[str, Any] = {"nvidia_smi_L": smi_l, "nvidia_smi": smi, "cluster_status": cluster, "workers": workers}
    checks = []
    worker_pid = None
    for w in wlist:
        gpus = w.get("gpus") or []
        worker_pid = w.get("pid") or worker_pid
        by_uuid = {g["uuid"]: g for g in smi}
        for g in gpus:
            s = by_uuid.get(g.get("uuid"))
            ok = bool(s) and s["name"] == g.get("name") and s["index"] == g.get("index") and abs(
                s["memory_total_mib"] - g.get("memory_total_mib", -1)) <= 1  # fmt: skip
            checks.append(f"worker {w['worker_id']} gpu {g.get('index')} {g.get('uuid')} {g.get('name')} "
                          f"{g.get('memory_total_mib')} MiB: {'matches nvidia-smi' if ok else 'MISMATCH'}")  # fmt: skip
        expected = [s for s in smi if s["index"] in (w.get("gpu_ids") or [])]
        same = sorted(g.get("uuid") for g in gpus) == sorted(s["uuid"] for s in expected)
        checks.append(f"worker {w['worker_id']} gpu_ids {w.get('gpu_ids')} -> reports {len(gpus)} GPU(s): "
                      f"{'exactly the given GPU(s)' if same else 'DIFFERENT from gpu_ids'}")  # fmt: skip
    procs = []
    if worker_pid:
        tree = [worker_pid, *_descendants(worker_pid)]
        for pid in tree:
            env = _environ(pid)
            procs.append({"pid": pid, "cmd": _cmdline(pid), "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", "<unset>")})
        apps = gpu_apps()
        report["nvidia_smi_compute_apps"] = apps
        app_pids = {int(a.split(",")[0]) for a in apps}
        checks.append(f"GPU compute processes {sorted(app_pids)} all in the managed worker's tree: {app_pids <= set(tree)}")
        gw_env = _environ(os.getpid())
        checks.append(f"gateway/bench environment CUDA_VISIBLE_DEVICES: {gw_env.get('CUDA_VISIBLE_DEVICES', '<unset>')}")
    report["worker_processes"] = procs
    report["checks"] = checks
    (state / "c-inventory.json").write_text(json.dumps(report, indent=2, default=str))
    say("inventory:\n  nvidia-smi -L: " + smi_l.replace("\n", "\n                 "))
    for p in procs:
        say(f"  pid {p['pid']} CUDA_VISIBLE_DEVICES={p['CUDA_VISIBLE_DEVICES']}  {p['cmd'][:100]}")
    for c in checks:
        say("  " + c)
    say(f"  cluster_status.gpu_ids_in_use: {(cluster or {}).get('gpu_ids_in_use')}")
    return worker_pid


VIS_PROBE = (
    "import json, os, torch; from ichat.worker.gpus import gpu_inventory; "
    "print(json.dumps({'CUDA_VISIBLE_DEVICES': os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'), "
    "'nvml_inventory': [g['index'] for g in gpu_inventory()], 'torch_device_count': torch.cuda.device_count()}))"
)


def visibility_probe(state: Path) -> None:
    """ichat.worker.gpus under several CUDA_VISIBLE_DEVICES values vs what CUDA itself sees."""
    smi = run_text(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"]).split()
    uuid = smi[0] if smi else "GPU-none"
    selectors: list[str | None] = [None, "0", uuid, uuid[:12], "1", ""]
    procs = []
    for sel in selectors:
        env = child_env()
        env.pop("CUDA_VISIBLE_DEVICES", None)
        if sel is not None:
            env["CUDA_VISIBLE_DEVICES"] = sel
        procs.append(subprocess.Popen([PY, "-c", VIS_PROBE], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        try:
            rows.append(json.loads(out.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            rows.append({"error": err[-400:]})
    for row in rows:
        if "error" not in row:
            row["agree"] = len(row["nvml_inventory"]) == row["torch_device_count"]
        say(f"  visibility: {row}")
    (state / "c-visibility.json").write_text(json.dumps(rows, indent=2))


def profile_gateway(state: Path, gw_pid: int) -> None:
    """py-spy record of the gateway process while vLLM's client loads it (c=64, then c=1)."""
    pyspy = shutil.which("py-spy") or next((p for p in ("/tmp/site/bin/py-spy",) if Path(p).exists()), None)
    if pyspy is None:
        say("py-spy not found: no gateway profile")
        return
    try:
        scope = Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()
    except OSError:
        scope = "n/a"
    say(f"profiling gateway pid {gw_pid} with {pyspy} (yama ptrace_scope {scope})")
    for config in ("c64", "ttft"):
        if left() < 100:
            say(f"no time left to profile under {config}")
            return
        out = state / f"c-pyspy-{config}.txt"
        rec = subprocess.Popen(
            [pyspy, "record", "-p", str(gw_pid), "-r", "250", "--nonblocking", "--format", "raw", "-o", str(out)],
            stdout=open(state / "c-pyspy.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,  # noqa: SIM115
        )  # fmt: skip
        time.sleep(1.0)
        if rec.poll() is not None:
            say(f"py-spy exited at once ({rec.returncode}): see c-pyspy.log")
            return
        bench(state, [("c-profiled", PORTS["c"], config)], "c-bench-profiled.log")
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGINT)
        try:
            rec.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGKILL)
        if out.exists():
            (state / f"c-pyspy-{config}-top.txt").write_text(summarize_stacks(out))
            say(f"gateway profile under {config}:\n" + "\n".join(summarize_stacks(out).splitlines()[:28]))


def summarize_stacks(path: Path, top: int = 20) -> str:
    """Collapsed stacks ('a;b;c N') -> share of samples by leaf (self) and by frame (inclusive)."""
    self_c: collections.Counter[str] = collections.Counter()
    incl_c: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        self_c[frames[-1]] += n
        for frame in set(frames):
            incl_c[frame] += n
    lines = [f"{total} samples (active only)", "self:"]
    lines += [f"  {100 * n / max(total, 1):5.1f}%  {f[:150]}" for f, n in self_c.most_common(top)]
    lines.append("inclusive:")
    lines += [f"  {100 * n / max(total, 1):5.1f}%  {f[:150]}" for f, n in incl_c.most_common(top)]
    return "\n".join(lines)


# -- table ----------------------------------------------------------------------------------------


def load_results(state: Path) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for label in LABELS:
        for config in CONFIGS:
            path = state / f"bench-{label}-{config}.json"
            if path.exists():
                out[(label, config)] = json.loads(path.read_text())
    return out


def table(state: Path) -> str:
    env = json.loads((state / "env.json").read_text()) if (state / "env.json").exists() else {}
    res = load_results(state)
    head = (
        f"GPU: {env.get('gpu', '?')} ({env.get('nvidia_smi', '?')}); vLLM {env.get('vllm', '?')}; torch {env.get('torch', '?')}; "
        f"model SmolLM2-135M-Instruct (bf16, {MODEL}); date {env.get('date_utc', '?')} UTC\n"
        "vLLM bench serve: random dataset, 512 input tokens, --ignore-eos, /v1/completions (openai backend), seed 0\n"
    )
    rows = [
        "| server | load | done/failed | TTFT p50 ms | TTFT p99 ms | TPOT mean ms | TPOT p50 ms | output tok/s | req/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"c1": "c=1, 32 prompts, 128 out", "c64": "c=64, 512 prompts, 128 out", "ttft": "c=1, 128 prompts, 16 out"}
    for config, load in names.items():
        for label, title in LABELS.items():
            r = res.get((label, config))
            if r is None:
                continue
            rows.append(
                f"| {title} | {load} | {r.get('completed')}/{r.get('failed')} | "
                f"{r.get('p50_ttft_ms', float('nan')):.2f} | {r.get('p99_ttft_ms', float('nan')):.2f} | "
                f"{r.get('mean_tpot_ms', float('nan')):.3f} | {r.get('median_tpot_ms', float('nan')):.3f} | "
                f"{r.get('output_throughput', float('nan')):.0f} | {r.get('request_throughput', float('nan')):.2f} |"
            )
    verdict = ["", "Targets (issue 9):"]

    def get(label: str, config: str, key: str) -> float | None:
        r = res.get((label, config))
        return None if r is None or r.get(key) is None else float(r[key])

    for label in ("b", "c"):
        done = [(c, res[(label, c)]) for c in CONFIGS if (label, c) in res]
        ok = bool(done) and all(r.get("failed") == 0 and r.get("completed") == r.get("num_prompts") for c, r in done)
        if not done:
            verdict.append(f"- {LABELS[label]}: not run")
            continue
        counts = ", ".join(f"{c}: {r.get('completed')}/{r.get('num_prompts')} done, {r.get('failed')} failed" for c, r in done)
        verdict.append(f"- {LABELS[label]} completes every request: {'yes' if ok else 'NO'} ({counts})")
    a64, c64 = get("a", "c64", "output_throughput"), get("c", "c64", "output_throughput")
    if a64 and c64:
        verdict.append(f"- (c)/(a) output tok/s at c=64: {c64:.0f}/{a64:.0f} = {c64 / a64:.3f} (target >= 0.97): "
                       f"{'met' if c64 / a64 >= 0.97 else 'MISSED'}")  # fmt: skip
    for config in ("c1", "ttft"):
        b1, c1, d1 = get("b", config, "p50_ttft_ms"), get("c", config, "p50_ttft_ms"), get("c-direct", config, "p50_ttft_ms")
        if b1 is not None and c1 is not None:
            verdict.append(f"- TTFT p50 {names[config]}: (c) - (b) = {c1 - b1:+.2f} ms (target <= 1 ms): "
                           f"{'met' if c1 - b1 <= 1.0 else 'MISSED'}")  # fmt: skip
        if d1 is not None and c1 is not None:
            verdict.append(f"  same engine, gateway vs direct: (c) - (c') = {c1 - d1:+.2f} ms")
    text = head + "\n" + "\n".join(rows) + "\n" + "\n".join(verdict) + "\n"
    (state / "table.md").write_text(text)
    return text


def pack(state: Path, out: Path | None, tag: str) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / f"state-{tag}.tar.gz", "w:gz") as tar:
        tar.add(state, arcname="ichat-bench")
    for name in ("table.md", "c-inventory.json", "ab-summary.txt"):
        if (state / name).exists():
            shutil.copy(state / name, out / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phases", nargs="+", choices=["a", "b", "c", "ab", "table"])
    parser.add_argument("--state", default="/root/ichat-bench", help="results kept here between calls")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="copy results here ($OUT on the device)")
    parser.add_argument("--deadline", type=float, default=None, help="epoch seconds by which to be done")
    args = parser.parse_args()
    global DEADLINE
    if args.deadline:
        DEADLINE = args.deadline
    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else None
    funcs = {"a": phase_a, "b": phase_b, "c": phase_c, "ab": phase_ab}
    rc = 0
    try:
        for phase in args.phases:
            if phase == "table":
                print(table(state), flush=True)
                continue
            t0 = time.monotonic()
            try:
                funcs[phase](state)
            except Exception as exc:  # noqa: BLE001 -- keep going: the next phase and the packing still run
                rc = 1
                say(f"phase {phase} FAILED: {exc}")
            say(f"phase {phase} took {time.monotonic() - t0:.0f}s")
    finally:
        pack(state, out, "-".join(args.phases))
    return rc


if __name__ == "__main__":
    sys.exit(main())
