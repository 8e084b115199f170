"""The supervisor's pure parts: the state machine and restart backoff, with a fake clock."""

import pytest

from ichat.config import ManagedWorkerSpec, SupervisorSettings
from ichat.gateway import supervisor as sv

SETTINGS = SupervisorSettings(backoff_initial_s=1, backoff_max_s=8, crash_loop_max=4, crash_loop_window_s=100)


def test_happy_path_and_crash_restart_cycle():
    state = sv.STOPPED
    for nxt in (sv.STARTING, sv.READY, sv.UNHEALTHY, sv.READY, sv.CRASHED, sv.BACKING_OFF, sv.STARTING, sv.STOPPING, sv.STOPPED):
        state = sv.transition(state, nxt)
    assert state == sv.STOPPED


@pytest.mark.parametrize(("src", "dst"), [(sv.STOPPED, sv.READY), (sv.STOPPED, sv.CRASHED), (sv.STOPPING, sv.READY), (sv.FAILED, sv.READY)])
def test_invalid_transitions_are_refused(src, dst):
    with pytest.raises(sv.InvalidTransition):
        sv.transition(src, dst)


def test_backoff_doubles_and_caps():
    crashes, delays = [], []
    for t in range(3):
        crashes.append(float(t))
        delays.append(sv.restart_delay(crashes, float(t), SETTINGS))
    assert delays == [1, 2, 4]


def test_crash_loop_gives_up_inside_the_window_only():
    crashes = [0.0, 1.0, 2.0, 3.0]
    assert sv.restart_delay(crashes, 3.0, SETTINGS) is None
    # the same crashes, long ago: back to the initial delay
    assert sv.restart_delay(crashes + [500.0], 500.0, SETTINGS) == 1


def test_backoff_cap():
    s = SupervisorSettings(backoff_initial_s=1, backoff_max_s=3, crash_loop_max=10)
    assert sv.restart_delay([0, 1, 2, 3, 4], 4, s) == 3


def test_exit_description():
    assert sv.describe_exit(-9) == {"exit_code": None, "signal": "SIGKILL"}
    assert sv.describe_exit(1) == {"exit_code": 1, "signal": None}


def test_spec_digest_changes_with_the_spec():
    a = ManagedWorkerSpec(model_name="m", model_path="/p", port=8001)
    b = ManagedWorkerSpec(model_name="m", model_path="/p", port=8001, engine_flags={"max_model_len": 512})
    assert sv.spec_digest(a) == sv.spec_digest(ManagedWorkerSpec(model_name="m", model_path="/p", port=8001))
    assert sv.spec_digest(a) != sv.spec_digest(b)


def test_gpu_ids_become_cuda_visible_devices(monkeypatch):
    spec = ManagedWorkerSpec(model_name="m", model_path="/p", port=8001, gpu_ids=(1, 0))
    worker = sv.ManagedWorker(spec, gateway_url="http://127.0.0.1:4000", settings=SETTINGS)
    env = worker._env()
    assert env["CUDA_VISIBLE_DEVICES"] == "1,0"
    argv = worker._argv()
    assert argv[argv.index("--gateway-address") + 1] == "http://127.0.0.1:4000"
    assert argv[argv.index("--worker-id") + 1] == "managed-m-8001"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    no_gpu = sv.ManagedWorker(ManagedWorkerSpec(model_name="m", model_path="/p", port=8002), gateway_url="x", settings=SETTINGS)
    assert "CUDA_VISIBLE_DEVICES" not in no_gpu._env()


def test_observe_marks_hung_worker_for_restart(monkeypatch):
    now = [0.0]
    worker = sv.ManagedWorker(
        ManagedWorkerSpec(model_name="m", model_path="/p", port=8001), gateway_url="x",
        settings=SupervisorSettings(hung_restart_s=10), clock=lambda: now[0],
    )  # fmt: skip
    killed = []
    monkeypatch.setattr(worker, "_kill_group", lambda reason: killed.append(reason))
    worker.state = sv.STARTING
    worker.observe("ready", now[0])
    assert worker.state == sv.READY
    now[0] = 1.0
    worker.observe("unhealthy", now[0])
    assert worker.state == sv.UNHEALTHY and not killed
    now[0] = 12.0
    worker.observe("unhealthy", now[0])
    assert killed and "unhealthy for" in killed[0]


def test_a_record_of_the_crashed_process_does_not_make_its_replacement_ready():
    worker = sv.ManagedWorker(ManagedWorkerSpec(model_name="m", model_path="/p", port=8001), gateway_url="x", settings=SETTINGS)
    worker.state, worker.pid = sv.STARTING, 200
    worker.observe("ready", 0.0, registered_pid=100)  # fresh beats, but from the old pid
    assert worker.state == sv.STARTING
    worker.observe("ready", 0.1, registered_pid=200)
    assert worker.state == sv.READY


# -- decide(): the keep-alive on one clock --------------------------------------------------------

HUNG = SupervisorSettings(hung_restart_s=10, start_timeout_s=100)


def test_decide_moves_with_the_registry_and_kills_only_after_the_deadline():
    assert sv.decide(sv.STARTING, 0.0, 1.0, "ready", HUNG) == sv.Decision(sv.READY)
    assert sv.decide(sv.READY, 0.0, 1.0, None, HUNG) == sv.Decision(sv.UNHEALTHY)
    assert sv.decide(sv.UNHEALTHY, 0.0, 5.0, "unhealthy", HUNG) == sv.Decision(sv.UNHEALTHY)
    hung = sv.decide(sv.UNHEALTHY, 0.0, 11.0, "unhealthy", HUNG)
    assert hung.state == sv.UNHEALTHY and "unhealthy for 11s" in hung.kill
    slow = sv.decide(sv.STARTING, 0.0, 101.0, "loading", HUNG)
    assert "not ready after 101s" in slow.kill
    assert sv.decide(sv.CRASHED, 0.0, 1000.0, None, HUNG) == sv.Decision(sv.CRASHED)


# -- adoption: only a proven child ------------------------------------------------------------------


def _info(secret="s", challenge="c", pid=4242, port=8001, **patch):
    from ichat.protocol import child_proof

    info = {"worker_id": "managed-m-8001", "spec_digest": "d", "pid": pid, "proof": child_proof(secret, challenge, pid, port)}
    info.update(patch)
    return info


def test_adoption_needs_a_proof_bound_to_pid_and_port():
    """Before: whatever answered /info with the right worker id and digest was adopted, and the
    pid it named was later signalled."""
    refusal = lambda info: sv.adoption_refusal(info, "managed-m-8001", "d", 8001, "s", "c")  # noqa: E731
    assert refusal(_info()) is None
    assert "prove" in refusal(_info(secret="guess"))
    assert "prove" in refusal(_info(pid=1234) | {"pid": 999})  # a proof for another pid
    assert "prove" in refusal(_info(port=9000))  # relayed from a worker on another port
    assert refusal(_info(proof=None)) == "no pid or proof"
    assert refusal(_info(pid=1)) == "no pid or proof"
    assert "spec" in refusal(_info(spec_digest="other"))
    assert refusal(None) == "no worker info"


def test_a_pid_is_a_worker_only_if_its_command_line_says_so():
    import os

    assert not sv._is_worker_process(os.getpid(), "managed-m-8001")  # pytest, not a worker
    assert not sv._is_worker_process(2**22 + 7, "managed-m-8001")  # no such process


def test_children_get_their_secret_not_the_cluster_token(monkeypatch):
    monkeypatch.setenv("ICHAT_WORKER_SECRET", "inherited")
    worker = sv.ManagedWorker(ManagedWorkerSpec(model_name="m", model_path="/p", port=8001), gateway_url="x", settings=SETTINGS, child_secret="mine")
    env = worker._env()
    assert env["ICHAT_WORKER_SECRET"] == "mine"
    assert "mine" not in " ".join(worker._argv())  # never on a command line other users can read


def test_a_crashed_processs_fresh_record_does_not_make_its_replacement_ready():
    """Before: while the replacement was being spawned the worker still held the crashed
    process's pid, so that process's fresh `ready` record (same pid) passed for the new one and
    the worker went `starting -> ready` before its process existed (seen after a kill -9)."""
    worker = sv.ManagedWorker(
        ManagedWorkerSpec(model_name="m", model_path="/p", port=8001), gateway_url="x",
        settings=SETTINGS, clock=lambda: 0.0,
    )  # fmt: skip
    worker._set(sv.STARTING)
    worker.pid = None  # what _spawn sets first, before it awaits the new process
    worker.observe("ready", 0.0, registered_pid=4242)
    assert worker.state == sv.STARTING
    worker.pid = 4243
    worker.observe("ready", 0.0, registered_pid=4242)
    assert worker.state == sv.STARTING
    worker.observe("ready", 0.0, registered_pid=4243)
    assert worker.state == sv.READY
