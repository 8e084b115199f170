"""Real processes for end-to-end tests: start, wait on a condition with a deadline, stop cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this test run: the OS may give the same
    ephemeral port to two back-to-back binds, and a gateway and its managed worker must differ."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def models_dir() -> Path:
    return Path(os.environ.get("ICHAT_MODELS_DIR", Path.home() / ".cache" / "ichat" / "models"))


def smollm2_path() -> str:
    path = models_dir() / "smollm2-135m-instruct"
    assert (path / "config.json").is_file(), f"{path} missing: run `make models`"
    return str(path)


def minilm_path() -> str:
    path = models_dir() / "all-minilm-l6-v2"
    assert (path / "config.json").is_file(), f"{path} missing: run `make models`"
    return str(path)


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # the thing may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


class Proc:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        full_env = dict(os.environ)
        full_env.setdefault("HF_HUB_OFFLINE", "1")
        full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        full_env["PYTHONUNBUFFERED"] = "1"
        for name, value in (env or {}).items():
            if value is None:
                full_env.pop(name, None)  # None unsets (VLLM_CPU_KVCACHE_SPACE overrides KV sizing flags)
            else:
                full_env[name] = value
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole group. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # engine subprocesses too, if any were left
        except ProcessLookupError:
            pass
        code = self.popen.wait(10)
        self._log.close()
        return code


class WorkerProc(Proc):
    """``python -m ichat.worker``. ``backend="vllm"`` adds ``--enforce-eager`` (no graph capture:
    a faster start on CPU) unless ``enforce_eager=False`` (a GPU benchmark); any other backend (``"stub"``) gets ``--backend NAME`` and no vLLM
    flag, which its own parser would refuse. ``host`` is the bind address (default 127.0.0.1)."""

    def __init__(
        self, tmp_dir: Path, model: str, name: str, *extra: str, port: int | None = None, env=None,
        backend: str = "vllm", host: str = "127.0.0.1", enforce_eager: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.name = name
        self.host = host
        self.base_url = f"http://{host}:{self.port}"
        engine_flags = (["--enforce-eager"] if enforce_eager else []) if backend == "vllm" else ["--backend", backend]
        bind = [] if host == "127.0.0.1" else ["--host", host]
        argv = [
            sys.executable, "-m", "ichat.worker", "--model", model, "--served-model-name", name,
            "--port", str(self.port), *bind, *engine_flags, *extra,
        ]
        self.health_seen: list[int] = []
        super().__init__(argv, tmp_dir / f"worker-{name}-{self.port}.log", env)

    def wait_ready(self, timeout: float = 240.0) -> None:
        def ready() -> bool:
            assert self.alive(), f"worker exited with {self.popen.returncode}:\n{self.log_text()[-3000:]}"
            try:
                status = httpx.get(self.base_url + "/health", timeout=2).status_code
            except httpx.TransportError:
                return False
            self.health_seen.append(status)
            return status == 200

        wait_until(ready, timeout, interval=0.25, what=f"worker {self.name} /health == 200")


class TcpRelay:
    """A TCP relay for cutting links on purpose: listens on ``listen``, forwards to ``target``.

    ``cut()`` closes every relayed connection (both sides see the link drop); between
    ``down()`` and ``up()`` new connections are accepted and closed at once, as a broken
    network path would. Threads, so that synchronous tests can use it; ``close()`` stops it.
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self.accepted = 0
        self._server = socket.create_server(listen)
        self._server.settimeout(0.2)
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._down = False
        self._closed = False
        self._thread = threading.Thread(target=self._accept_forever, name="tcp-relay", daemon=True)
        self._thread.start()

    def _accept_forever(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            if self._down:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> int:
        """Close every relayed connection now; returns how many there were."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        return len(pairs)

    def down(self) -> None:
        self._down = True
        self.cut()

    def up(self) -> None:
        self._down = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._thread.join(2)
        self._server.close()
