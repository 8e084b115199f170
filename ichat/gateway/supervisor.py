"""Managed workers: processes the gateway starts, watches, restarts and stops.

Each managed worker is ``python -m ichat.worker`` in its own process group (its engine
subprocesses included), with ``CUDA_VISIBLE_DEVICES`` from ``gpu_ids`` and ``--gateway-address``
pointing here, so it registers through heartbeats like any other worker. Its states:

    stopped --start--> starting --registry says ready--> ready <--> unhealthy
    starting/ready/unhealthy --process exits--> crashed --> backing_off --> starting
    crashed --too many crashes in the window--> failed (no more restarts until reload/launch)
    any running state --stop--> stopping --> stopped

Stop = SIGTERM to the worker (it drains), wait ``stop_timeout_s``, then SIGKILL its whole process
group: no orphan engine processes. A crash keeps the exit code or signal and the last lines the
process printed. A worker that stays unhealthy (hung) or never gets ready is killed and
restarted. After a gateway crash, a still-running worker whose spec digest matches is adopted
instead of started twice.

The pure part (transitions, ``decide``, backoff) is at the top; the process handling below it.
Every time comes from one injected clock (the control plane's).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import attrs
import orjson

from ichat.backoff import exponential
from ichat.config import ManagedWorkerSpec, SupervisorSettings
from ichat.errors import InvalidTransition
from ichat.gateway.childkeys import new_challenge
from ichat.protocol import CHALLENGE_PARAM, READY, UNHEALTHY, WORKER_SECRET_ENV, child_proof

log = logging.getLogger("ichat.gateway.supervisor")

#: READY and UNHEALTHY are the shared words of ichat.protocol; the rest are the supervisor's own
STOPPED, STARTING = "stopped", "starting"
CRASHED, BACKING_OFF, STOPPING, FAILED = "crashed", "backing_off", "stopping", "failed"

TRANSITIONS: dict[str, frozenset[str]] = {
    STOPPED: frozenset({STARTING}),
    STARTING: frozenset({READY, UNHEALTHY, CRASHED, STOPPING}),
    READY: frozenset({UNHEALTHY, CRASHED, STOPPING}),
    UNHEALTHY: frozenset({READY, CRASHED, STOPPING}),
    CRASHED: frozenset({BACKING_OFF, FAILED, STOPPING, STOPPED}),
    BACKING_OFF: frozenset({STARTING, STOPPING, STOPPED}),
    STOPPING: frozenset({STOPPED}),
    FAILED: frozenset({STARTING, STOPPING, STOPPED}),
}
RUNNING_STATES = frozenset({STARTING, READY, UNHEALTHY})
LAST_LINES = 200


def transition(current: str, new: str) -> str:
    """Pure: the new state, if the machine allows going there from ``current``."""
    if new == current:
        return current
    if new not in TRANSITIONS.get(current, frozenset()):
        raise InvalidTransition(f"managed worker cannot go from {current} to {new}")
    return new


def restart_delay(crash_times: list[float], now: float, settings: SupervisorSettings) -> float | None:
    """Pure: seconds to wait before the next restart, or None for a crash loop (give up).

    Only crashes inside ``crash_loop_window_s`` count, so a worker that ran fine for a while
    starts again from the initial delay.
    """
    recent = [t for t in crash_times if now - t <= settings.crash_loop_window_s]
    if len(recent) >= settings.crash_loop_max:
        return None
    return exponential(len(recent), first=settings.backoff_initial_s, cap=settings.backoff_max_s)


@attrs.frozen
class Decision:
    """What the keep-alive decided: the state to be in, and why to kill the process (if so)."""

    state: str
    kill: str | None = None


def decide(
    state: str, state_since: float, now: float, registry_status: str | None, settings: SupervisorSettings
) -> Decision:
    """Pure: feed the registry's view (ready/unhealthy/None = no current record) into the state
    machine; a worker unhealthy too long (hung) or never ready gets killed, so it restarts."""
    new = state
    if state == STARTING and registry_status == READY:
        new = READY
    elif state == READY and registry_status in (UNHEALTHY, None):
        new = UNHEALTHY
    elif state == UNHEALTHY and registry_status == READY:
        new = READY
    age = 0.0 if new != state else now - state_since
    if new == UNHEALTHY and age > settings.hung_restart_s:
        return Decision(new, f"unhealthy for {age:.0f}s: killing it to restart")
    if new == STARTING and age > settings.start_timeout_s:
        return Decision(new, f"not ready after {age:.0f}s: killing it to restart")
    return Decision(new)


def spec_digest(spec: ManagedWorkerSpec) -> str:
    """What identifies a spec: a change means a restart on reload, a match allows adoption."""
    data = orjson.dumps(attrs.asdict(spec), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()[:16]


def describe_exit(returncode: int | None) -> dict[str, Any]:
    if returncode is None:
        return {"exit_code": None, "signal": None}
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return {"exit_code": None, "signal": name}
    return {"exit_code": returncode, "signal": None}


# -- the shell: one managed process ----------------------------------------------------------


class ManagedWorker:
    def __init__(
        self,
        spec: ManagedWorkerSpec,
        *,
        gateway_url: str,
        settings: SupervisorSettings,
        child_secret: str | None = None,
        on_line: Callable[[str, str, str], None] | None = None,
        echo: bool = True,
        launched: bool = False,
        clock: Callable[[], float] = time.monotonic,
        session: Callable[[], aiohttp.ClientSession | None] = lambda: None,
    ) -> None:
        self.spec = spec
        self.worker_id = spec.worker_id
        self.digest = spec_digest(spec)
        self.gateway_url = gateway_url
        self.settings = settings
        #: proves to the gateway (and a restarted gateway) that this process is its child
        self.child_secret = child_secret
        #: the control plane's client session (one per process), for adoption checks
        self._session = session
        self.on_line = on_line
        self.echo = echo
        #: started through the admin API (persisted in the state file), not the config
        self.launched = launched
        self.clock = clock
        self.state = STOPPED
        self.state_since = clock()
        self.pid: int | None = None
        self.adopted = False
        self.restarts = 0
        self.crash_times: list[float] = []
        self.last_exit: dict[str, Any] | None = None
        self.last_lines: collections.deque[str] = collections.deque(maxlen=LAST_LINES)
        self.message: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._exited = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []
        self._watch_task: asyncio.Task[None] | None = None

    # -- state ---------------------------------------------------------------------------------

    def _set(self, new: str, message: str | None = None) -> None:
        if new != self.state:
            self.state = transition(self.state, new)
            self.state_since = self.clock()
            log.info("managed worker %s: %s%s", self.worker_id, new, f" ({message})" if message else "")
        if message is not None:
            self.message = message

    def observe(self, registry_status: str | None, now: float, registered_pid: int | None = None) -> None:
        """Apply ``decide`` to this worker. A record from an earlier process of this worker (the
        beats of the instance that just crashed are still fresh) says nothing about the new one:
        it counts only when its pid is the one running now."""
        if registered_pid is not None and registered_pid != self.pid:
            registry_status = None
        decision = decide(self.state, self.state_since, now, registry_status, self.settings)
        if decision.state != self.state:
            self._set(decision.state, "missed heartbeats or failed health probes" if decision.state == UNHEALTHY else None)
        if decision.kill is not None:
            self._kill_group(decision.kill)

    def snapshot(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "managed_state": self.state,
            "state_for_s": round(self.clock() - self.state_since, 1),
            "pid": self.pid,
            "adopted": self.adopted,
            "launched": self.launched,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "message": self.message,
            "gpu_ids": list(self.spec.gpu_ids),
            "spec": attrs.asdict(self.spec),
        }

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._stop_requested.clear()
            if self.state == FAILED:
                self.crash_times.clear()
            self._task = asyncio.create_task(self._run(), name=f"managed-{self.worker_id}")

    async def stop(self) -> None:
        """SIGTERM, wait ``stop_timeout_s``, SIGKILL the process group; returns when it is gone."""
        self._stop_requested.set()
        if self._task is not None:
            await self._task
        if self.state != STOPPED:
            self._set(STOPPED)

    async def _run(self) -> None:
        while not self._stop_requested.is_set():
            self._set(STARTING)
            if not await self._adopt():
                await self._spawn()
            stop_wait = asyncio.ensure_future(self._stop_requested.wait())
            exit_wait = asyncio.ensure_future(self._exited.wait())
            await asyncio.wait({stop_wait, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            exit_wait.cancel()
            if self._stop_requested.is_set():
                await self._terminate()
                return
            # it died on its own; its engine processes must not outlive it
            self._kill_group(None)
            now = self.clock()
            self.crash_times.append(now)
            self.last_exit = {**describe_exit(self._returncode()), "at": time.time(), "last_lines": list(self.last_lines)[-30:]}
            self._set(CRASHED, f"exited: {self.last_exit['exit_code'] if self.last_exit['signal'] is None else self.last_exit['signal']}")
            log.warning(
                "managed worker %s exited (%s); last lines:\n  %s",
                self.worker_id, describe_exit(self._returncode()), "\n  ".join(list(self.last_lines)[-10:]),
            )
            delay = restart_delay(self.crash_times, now, self.settings)
            if delay is None:
                self._set(
                    FAILED,
                    f"crash loop: {self.settings.crash_loop_max} crashes within {self.settings.crash_loop_window_s:.0f}s; "
                    "not restarting until the config is reloaded or the worker is launched again",
                )
                log.error("managed worker %s: %s", self.worker_id, self.message)
                return
            self._set(BACKING_OFF, f"restarting in {delay:.1f}s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), timeout=delay)
            if self._stop_requested.is_set():
                self._set(STOPPED)
                return
            self.restarts += 1

    def _returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def _argv(self) -> list[str]:
        return [
            sys.executable, "-m", "ichat.worker",
            *self.spec.to_worker_argv(),
            "--gateway-address", self.gateway_url,
            "--worker-id", self.worker_id,
        ]  # fmt: skip

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.spec.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in self.spec.gpu_ids)
        if self.spec.ray_address:
            env["RAY_ADDRESS"] = self.spec.ray_address  # vLLM's Ray executor joins this cluster
        env["ICHAT_SPEC_DIGEST"] = self.digest
        env["PYTHONUNBUFFERED"] = "1"
        if self.child_secret:
            env[WORKER_SECRET_ENV] = self.child_secret
        return env

    async def _spawn(self) -> None:
        # Until the new process exists, no pid is ours: the crashed one's fresh record (its pid)
        # must not pass for the replacement while the spawn is awaited.
        self.pid = None
        self._exited.clear()
        self.adopted = False
        self.last_lines.clear()
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv(),
            env=self._env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: one killpg reaches the engine too
        )
        self.pid = self._proc.pid
        log.info("managed worker %s: started pid %d on port %d", self.worker_id, self.pid, self.spec.port)
        self._readers = [
            asyncio.create_task(self._read(self._proc.stdout, "stdout")),
            asyncio.create_task(self._read(self._proc.stderr, "stderr")),
        ]
        self._watch_task = asyncio.create_task(self._wait_exit(self._proc))

    async def _wait_exit(self, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        # let the readers take the last lines (printed just before the crash)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._readers, return_exceptions=True), timeout=2)
        self._exited.set()

    async def _read(self, stream: asyncio.StreamReader | None, name: str) -> None:
        if stream is None:
            return
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the reader's limit: take what is there
                raw = await stream.read(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                continue
            self.last_lines.append(line)
            if self.on_line is not None:
                self.on_line(self.worker_id, name, line)
            if self.echo:
                sys.stderr.write(f"[{self.worker_id}] {line}\n")

    async def _adopt(self) -> bool:
        """A worker of this spec still running from before a gateway restart: keep it, once it
        proved it is this gateway's child (see the module docstring)."""
        session = self._session()
        if session is None or not self.child_secret:
            return False
        challenge = new_challenge()
        url = f"http://{self.spec.host}:{self.spec.port}/info"
        try:
            async with session.get(url, params={CHALLENGE_PARAM: challenge}, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                info = await resp.json() if resp.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return False
        reason = adoption_refusal(info, self.worker_id, self.digest, self.spec.port, self.child_secret, challenge)
        if reason is None and not _alive(info["pid"]):
            reason = f"pid {info['pid']} is not running"
        if reason is None and not _is_worker_process(info["pid"], self.worker_id):
            reason = f"pid {info['pid']} is not the worker {self.worker_id}"
        if reason is not None:
            if info is not None:
                log.warning("managed worker %s: not adopting what answers on port %d: %s", self.worker_id, self.spec.port, reason)
            return False
        pid = info["pid"]
        self._proc = None
        self._exited.clear()
        self.pid, self.adopted = pid, True
        log.info("managed worker %s: adopted running pid %d (it proved it is our child; its spec is unchanged)", self.worker_id, pid)
        self._watch_task = asyncio.create_task(self._watch_adopted(pid))
        return True

    async def _watch_adopted(self, pid: int) -> None:
        # Not our child: no wait() possible, so poll for its exit.
        while _alive(pid):
            await asyncio.sleep(0.5)
        self._exited.set()

    async def _terminate(self) -> None:
        if self.state in RUNNING_STATES or self.state in (CRASHED, FAILED, BACKING_OFF):
            with contextlib.suppress(InvalidTransition):
                self._set(STOPPING)
        pid = self.pid
        if pid is not None and not self._exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # the worker drains, then stops its engine
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exited.wait(), timeout=self.settings.stop_timeout_s)
        self._kill_group(None)
        if not self._exited.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exited.wait(), timeout=10)
        if self.state == STOPPING:
            self._set(STOPPED)

    def _kill_group(self, reason: str | None) -> None:
        if self.pid is None:
            return
        if reason:
            log.warning("managed worker %s: %s", self.worker_id, reason)
            self.message = reason
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def adoption_refusal(info: Any, worker_id: str, digest: str, port: int, secret: str, challenge: str) -> str | None:
    """Pure: why an ``/info`` answer does not prove to be our child (None: it does)."""
    if not isinstance(info, dict):
        return "no worker info"
    if info.get("worker_id") != worker_id:
        return f"it is worker {info.get('worker_id')!r}"
    if info.get("spec_digest") != digest:
        return "its spec differs"
    pid, proof = info.get("pid"), info.get("proof")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1 or not isinstance(proof, str):
        return "no pid or proof"
    if not hmac.compare_digest(proof, child_proof(secret, challenge, pid, port)):
        return "it could not prove it is this gateway's child"
    return None


def _is_worker_process(pid: int, worker_id: str) -> bool:
    """``/proc/<pid>/cmdline`` is ``... -m ichat.worker ... --worker-id <worker_id> ...``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode("utf-8", "replace").split("\0")
    except OSError:
        return False
    if "ichat.worker" not in argv:
        return False
    return any(a == "--worker-id" and b == worker_id for a, b in zip(argv, argv[1:]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not reaped by its parent) counts as gone
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    return True


class Supervisor:
    """All managed workers, keyed by worker id."""

    def __init__(self, factory: Callable[[ManagedWorkerSpec, bool], ManagedWorker]) -> None:
        self._factory = factory
        self.workers: dict[str, ManagedWorker] = {}

    def add(self, spec: ManagedWorkerSpec, *, launched: bool = False) -> ManagedWorker:
        worker = self._factory(spec, launched)
        worker.start()  # a worker that cannot start is not added
        self.workers[worker.worker_id] = worker
        return worker

    async def remove(self, worker_id: str) -> ManagedWorker | None:
        worker = self.workers.pop(worker_id, None)
        if worker is not None:
            await worker.stop()
        return worker

    async def stop_all(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers.values()), return_exceptions=True)

    def gpu_ids_in_use(self) -> dict[str, list[int]]:
        return {wid: list(w.spec.gpu_ids) for wid, w in self.workers.items() if w.spec.gpu_ids and w.state != STOPPED}
