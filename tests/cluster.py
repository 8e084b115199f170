"""A small real cluster for the failure drills: a gateway that other "hosts" reach, workers on
those hosts, and clients that record every request's outcome.

Hosts are network namespaces (tests/netns.py) joined to ours by veth pairs. The gateway listens
on all addresses, so a namespace worker dials the gateway over its own veth (``host.host_ip``);
with that, auth is on: client keys, an admin key and the worker token every worker presents.
Clients and admin calls stay on loopback.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.gateway_proc import GatewayProc, write_yaml
from tests.netns import NetnsHost
from tests.procs import Proc, WorkerProc, free_port, wait_until

CLIENT_KEY = "drill-client-key"
ADMIN_KEY = "drill-admin-key"
WORKER_TOKEN = "drill-worker-token"


def auth_section() -> dict[str, Any]:
    return {"api_keys": [CLIENT_KEY], "admin_key": ADMIN_KEY, "worker_token": WORKER_TOKEN}


class ClusterGateway(GatewayProc):
    """A gateway bound to ``host`` (default all addresses) with auth on; admin calls carry the key.

    Written out here rather than through GatewayProc.__init__, which binds loopback only."""

    def __init__(
        self, tmp_dir: Path, config: dict[str, Any], *, port: int | None = None, name: str = "gateway", host: str = "0.0.0.0"
    ) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp_dir / f"{name}.yaml"
        config = dict(config)
        config["server_settings"] = {**config.get("server_settings", {}), "host": host, "port": self.port}
        config.setdefault("state_dir", str(tmp_dir / f"{name}-state"))
        config.setdefault("auth", auth_section())
        self.config = config
        write_yaml(self.config_path, config)
        argv = [sys.executable, "-m", "ichat.gateway", "--config", str(self.config_path)]
        Proc.__init__(self, argv, tmp_dir / f"{name}-{self.port}.log")

    def url_for(self, host: NetnsHost | None) -> str:
        """The gateway's address as a worker on ``host`` dials it (None: this machine)."""
        return self.base_url if host is None else f"http://{host.host_ip}:{self.port}"

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def workers(self) -> dict[str, dict[str, Any]]:
        resp = httpx.get(self.base_url + "/v1/admin/workers", headers=self.admin_headers(), timeout=10)
        assert resp.status_code == 200, resp.text
        return {w["worker_id"]: w for w in resp.json()["data"]}

    def routable(self, worker_id: str) -> bool:
        return bool(self.workers().get(worker_id, {}).get("routable"))


class _InNamespace(Proc):
    """Runs the argv a subclass builds inside ``self.netns`` (set before ``__init__``)."""

    netns: NetnsHost

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(self.netns.wrap(argv), log_path, env)


class NamespaceWorker(WorkerProc, _InNamespace):
    """A worker on a namespace host, bound to the namespace's veth address (WorkerProc's
    ``super().__init__`` reaches ``_InNamespace`` first in this class's MRO)."""

    def __init__(self, netns: NetnsHost, tmp_dir: Path, model: str, name: str, *extra: str, **kwargs: Any) -> None:
        self.netns = netns
        super().__init__(tmp_dir, model, name, *extra, host=netns.ns_ip, **kwargs)


def worker_args(gateway: ClusterGateway, worker_id: str, host: NetnsHost | None, interval: float) -> list[str]:
    return [
        "--gateway-address", gateway.url_for(host), "--heartbeat-interval", str(interval),
        "--worker-id", worker_id, "--worker-token", WORKER_TOKEN,
    ]  # fmt: skip


def stub_worker(
    tmp_dir: Path, gateway: ClusterGateway, worker_id: str, *extra: str, host: NetnsHost | None = None,
    model: str = "stub", interval: float = 1.0, port: int | None = None,
) -> WorkerProc:
    """A stub-engine worker (the engine is beside the point in these drills) on ``host`` (a
    namespace, or this machine's loopback), registering with the worker token."""
    args = [*worker_args(gateway, worker_id, host, interval), *extra]
    if host is None:
        return WorkerProc(tmp_dir, "stub-model", model, *args, port=port, backend="stub")
    return NamespaceWorker(host, tmp_dir, "stub-model", model, *args, port=port, backend="stub")


def vllm_worker(
    tmp_dir: Path, gateway: ClusterGateway, worker_id: str, model_path: str, *extra: str, host: NetnsHost,
    model: str = "smollm2", interval: float = 1.0,
) -> WorkerProc:
    """A real vLLM worker on ``host`` registering over the veth with the worker token."""
    return NamespaceWorker(host, tmp_dir, model_path, model, *worker_args(gateway, worker_id, host, interval), *extra)


#: a client's pause after a failed request (a gateway that is down refuses in microseconds)
FAILURE_PAUSE_S = 0.01


class Clients:
    """``n`` threads sending requests in a loop, each outcome recorded as (start, end, ok, error)
    with monotonic times. A stream counts as ok only when it ended with ``data: [DONE]``."""

    def __init__(self, base_url: str, model: str, n: int = 4, *, timeout: float = 30.0, stream: bool = False) -> None:
        self.base_url = base_url
        self.model = model
        self.timeout = timeout
        self.stream = stream
        self.results: list[tuple[float, float, bool, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        body = {"model": self.model, "prompt": "Hi", "max_tokens": 4, "stream": self.stream}
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    resp = client.post("/v1/completions", json=body)
                    ok = resp.status_code == 200 and (not self.stream or resp.text.rstrip().endswith("data: [DONE]"))
                    error = "" if ok else f"HTTP {resp.status_code}: {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, error = False, repr(exc)
                with self._lock:
                    self.results.append((started, time.monotonic(), ok, error))
                if not ok:
                    self._stop.wait(FAILURE_PAUSE_S)  # a refused connection fails at once: do not spin

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def snapshot(self) -> list[tuple[float, float, bool, str]]:
        with self._lock:
            return list(self.results)

    def count_after(self, t: float) -> int:
        return sum(1 for r in self.snapshot() if r[0] > t)

    def wait_for(self, n: int, after: float, timeout: float) -> None:
        wait_until(lambda: self.count_after(after) >= n, timeout, what=f"{n} requests after t={after:.2f}")


def worst_wait(results: list[tuple[float, float, bool, str]], start: float, end: float) -> float:
    """The longest request that was in flight at any moment of [start, end]."""
    spans = [r[1] - r[0] for r in results if r[1] >= start and r[0] <= end]
    return max(spans, default=0.0)


def cmdlines() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return out


def worker_processes(worker_id: str) -> list[int]:
    """Pids of the worker processes running with ``--worker-id worker_id`` (any namespace)."""
    return sorted(
        pid for pid, cmd in cmdlines().items()
        if "ichat.worker" in cmd and f"--worker-id {worker_id} " in cmd + " " and not cmd.startswith("ip netns exec")
    )  # fmt: skip
