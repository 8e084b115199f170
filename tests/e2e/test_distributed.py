"""One model over several engine processes, on vLLM's CPU build: pipeline parallel on one host
with vLLM's multiprocessing executor, and a Ray cluster over two network-namespace hosts.

What vLLM's CPU build (0.32) can run here, and what it cannot (each checked by a test below):
- Pipeline parallel 2 with the multiprocessing executor: yes, with ``--compilation-config
  '{"mode": 2, "backend": "eager"}'`` instead of ``--enforce-eager``. Under ``--enforce-eager``
  the second stage fails on its first request (``assert self.intermediate_tensors is not None``,
  vllm/v1/worker/gpu_model_runner.py): those buffers are made by the warm-up pass, and the CPU
  worker skips warm-up in eager mode (vllm/v1/worker/cpu_worker.py, ``_should_warm_up_model``).
  Dynamo with the eager backend runs that pass without inductor's minutes of compiling.
- Several ranks on one NUMA node need ``VLLM_CPU_OMP_THREADS_BIND`` (one CPU list per rank);
  vLLM's automatic binding wants a NUMA node per rank (vllm/utils/ompmultiprocessing.py).
- Tensor parallel 2 cannot run SmolLM2 at all: it has 9 attention heads (vLLM: "Total number of
  attention heads (9) must be divisible by tensor parallel size (2)"); tensor parallel 3 starts
  but answers wrongly ("L'Étoile, la Marseillaise," for "Paris", eager or not). Tensor parallel
  2 is tested on MiniLM (12 heads): its embeddings match the 1-rank worker's.
- The Ray executor refuses the CPU platform: ``ValueError: current platform cpu does not support
  ray`` (vllm/v1/executor/ray_utils.py, ``initialize_ray_cluster``; ``ray_device_key`` is empty
  for CPU in vllm/platforms/interface.py). The Ray test below builds everything up to that line
  (a two-host cluster with token auth, a managed worker that joins it through ``ray_address``)
  and pins the refusal, so that it fails, and says so, on the day vLLM's CPU build accepts Ray.

Engine starts here are the slow part (a 2-rank engine takes ~60 s on two cores): one 1-rank
baseline, one hand-started 2-rank worker, one managed 2-rank worker started twice (its crash).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from ichat.logs.sse import SSEParser
from tests import netns
from tests.gateway_proc import GatewayProc
from tests.procs import Proc, WorkerProc, free_port, minilm_path, smollm2_path, wait_until

ENGINE_START_S = 400
INTERVAL = 1.0
# dynamo + eager backend: the warm-up pass that pipeline stages need, without inductor
COMPILATION = '{"mode": 2, "backend": "eager"}'
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    [{"role": "user", "content": "Name three colors."}],
]
MAX_TOKENS = 12


def omp_bind(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``ranks`` ranks on this machine's CPUs: one list per rank."""
    cpus = sorted(os.sched_getaffinity(0))
    lists = [cpus[i::ranks] or [cpus[i % len(cpus)]] for i in range(ranks)]
    return "|".join(",".join(map(str, group)) for group in lists)


def engine_env(ranks: int) -> dict[str, str]:
    return {"VLLM_CPU_OMP_THREADS_BIND": omp_bind(ranks), "VLLM_CPU_KVCACHE_SPACE": "1"}


class RankedWorker(Proc):
    """``python -m ichat.worker`` on SmolLM2 with ``ranks`` pipeline stages (1 = the baseline)."""

    def __init__(self, tmp: Path, name: str, ranks: int, *extra: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.name = name
        pp = ["--pipeline-parallel-size", str(ranks)] if ranks > 1 else []
        argv = [
            sys.executable, "-m", "ichat.worker", "--model", smollm2_path(), "--served-model-name", "smollm2",
            "--port", str(self.port), "--max-model-len", "1024", "--compilation-config", COMPILATION, *pp, *extra,
        ]  # fmt: skip
        super().__init__(argv, tmp / f"worker-{name}.log", engine_env(ranks))

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.alive(), f"worker {self.name} exited with {self.popen.returncode}:\n{self.log_text()[-4000:]}"
            try:
                return httpx.get(self.base_url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, ENGINE_START_S, interval=0.25, what=f"worker {self.name} ready")


def answers(base_url: str) -> list[str]:
    c = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=120, max_retries=0)
    out = []
    for messages in PROMPTS:
        reply = c.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
        out.append(reply.choices[0].message.content)
    completion = c.completions.create(model="smollm2", prompt="The sky is", temperature=0, max_tokens=MAX_TOKENS)
    out.append(completion.choices[0].text)
    return out


def group_members(pgid: int) -> dict[int, str]:
    """Live processes of a process group (zombies excluded), pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            state, _ppid, group = stat.rsplit(") ", 1)[1].split()[:3]
            if int(group) == pgid and state != "Z":
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found[int(entry.name)] = cmdline.strip()  # vLLM pads its ranks' process titles
        except (OSError, ValueError, IndexError):
            pass
    return found


def ranks_in(pgid: int) -> dict[int, str]:
    return {pid: cmd for pid, cmd in group_members(pgid).items() if cmd.startswith("VLLM::Worker_")}


def log_lines(base_url: str) -> list[str]:
    resp = httpx.get(base_url + "/logs/stream", params={"tail": 100_000, "follow": "false"}, timeout=30)
    assert resp.status_code == 200, resp.text
    return [orjson.loads(e.data)["line"] for e in SSEParser().feed(resp.content) if e.event == "log"]


@pytest.fixture(scope="module")
def tmp(e2e_tmp):
    path = e2e_tmp / "distributed"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def baseline(tmp):
    """The 1-rank worker's greedy answers, with the same flags; stopped before the 2-rank runs."""
    worker = RankedWorker(tmp, "one-rank", 1)
    try:
        worker.wait_ready()
        return answers(worker.base_url)
    finally:
        worker.stop()


def test_two_pipeline_stages_answer_as_one_rank_does_and_sigterm_stops_every_rank(tmp, baseline):
    assert "Paris" in baseline[0]
    worker = RankedWorker(tmp, "two-ranks", 2)
    try:
        worker.wait_ready()
        ranks = ranks_in(worker.pid)
        assert sorted(ranks.values()) == ["VLLM::Worker_PP0", "VLLM::Worker_PP1"], group_members(worker.pid)
        assert answers(worker.base_url) == baseline

        # Every rank's own lines reach the worker's log stream (captured at the fd level).
        lines = log_lines(worker.base_url)
        for prefix in ("(EngineCore pid=", "(Worker_PP0 pid=", "(Worker_PP1 pid="):
            assert any(line.startswith(prefix) for line in lines), f"no {prefix} line captured"

        # SIGTERM alone (no process-group kill yet) ends the worker and every rank.
        worker.popen.send_signal(signal.SIGTERM)
        assert worker.popen.wait(60) == 0
        wait_until(lambda: not group_members(worker.pid), 30, what="every process of the worker's group gone")
    finally:
        worker.stop()


SENTENCES = ["A cat sits on the mat", "A kitten rests on a rug", "Stock markets fell sharply"]


def embeddings(base_url: str) -> list[list[float]]:
    c = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=60, max_retries=0)
    return [item.embedding for item in c.embeddings.create(model="minilm", input=SENTENCES).data]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


def test_two_tensor_parallel_ranks_embed_as_one_rank_does(tmp, minilm_worker):
    one_rank = embeddings(minilm_worker.base_url)
    worker = WorkerProc(tmp, minilm_path(), "minilm", "--tensor-parallel-size", "2", env=engine_env(2))
    try:
        worker.wait_ready(ENGINE_START_S)
        assert sorted(ranks_in(worker.pid).values()) == ["VLLM::Worker_TP0", "VLLM::Worker_TP1"]
        two_ranks = embeddings(worker.base_url)
        # Not bit-equal: the all-reduce adds the halves' partial sums in another order.
        assert [round(cosine(a, b), 4) for a, b in zip(one_rank, two_ranks)] == [1.0, 1.0, 1.0]
        worker.popen.send_signal(signal.SIGTERM)
        assert worker.popen.wait(60) == 0
        wait_until(lambda: not group_members(worker.pid), 30, what="every TP rank gone after SIGTERM")
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def gateway(tmp):
    config = {
        "registry": {"probe_interval_s": 0.5, "probe_failures": 2, "probe_timeout_s": 2.0},
        "supervisor": {"backoff_initial_s": 0.5, "stop_timeout_s": 60, "start_timeout_s": ENGINE_START_S},
        "managed_workers": [
            {
                "model_name": "smollm2", "model_path": smollm2_path(), "port": free_port(),
                "heartbeat_interval": INTERVAL, "pipeline_parallel_size": 2, "max_model_len": 1024,
                "compilation_config": COMPILATION,
            }
        ],
    }  # fmt: skip
    # A managed worker inherits the gateway's environment: the CPU binding for its two ranks.
    proc = GatewayProc(tmp, config, env=engine_env(2))
    proc.wait_up()
    yield proc
    proc.stop(90)


def managed_view(gateway: GatewayProc) -> dict:
    return gateway.workers()[f"managed-smollm2-{gateway.config['managed_workers'][0]['port']}"]


def test_managed_two_rank_worker_survives_a_crashed_rank_and_gateway_stop_ends_its_group(gateway, baseline):
    gateway.wait_routable("smollm2", 1, ENGINE_START_S)
    assert answers(gateway.base_url) == baseline
    view = managed_view(gateway)
    pgid = view["pid"]
    ranks = {cmd: pid for pid, cmd in ranks_in(pgid).items()}
    assert set(ranks) == {"VLLM::Worker_PP0", "VLLM::Worker_PP1"}

    # A rank dies: vLLM marks the engine dead, the worker reports it and leaves, its group goes.
    os.kill(ranks["VLLM::Worker_PP1"], signal.SIGKILL)
    wait_until(lambda: not managed_view(gateway)["routable"], 15, interval=0.1, what="out of rotation")
    wait_until(lambda: not group_members(pgid), 60, what="the crashed worker's whole group gone")
    logged = gateway.log_text()
    assert "engine health check failed" in logged, logged[-3000:]

    # The supervisor starts it again; the new engine answers as before.
    gateway.wait_routable("smollm2", 1, ENGINE_START_S)
    view = managed_view(gateway)
    assert view["restarts"] == 1 and view["last_exit"]["exit_code"] == 1, view
    assert view["pid"] != pgid
    assert answers(gateway.base_url) == baseline

    # Stopping the gateway stops the worker, its engine core and both ranks.
    new_pgid = view["pid"]
    assert len(ranks_in(new_pgid)) == 2
    assert gateway.stop(90) == 0
    wait_until(lambda: not group_members(new_pgid), 30, what="the managed worker's group gone after gateway stop")


# -- two hosts through Ray --------------------------------------------------------------------

RAY = shutil.which("ray", path=os.path.dirname(sys.executable))


def ray_unavailable() -> str | None:
    if RAY is None:
        return "Ray is not installed (`pip install ray`; make setup installs it)"
    return netns.unavailable_reason()


class RayHosts:
    """A Ray head on this machine's side of a veth pair and a Ray node inside a namespace host,
    token authentication on (what README's recipe asks for)."""

    def __init__(self, tmp: Path) -> None:
        self.host = netns.NetnsHost("ray")
        self.port = free_port()
        self.env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": uuid.uuid4().hex,
        }
        self.log = open(tmp / "ray.log", "ab")

    @property
    def address(self) -> str:
        return f"{self.host.host_ip}:{self.port}"

    def ray(self, *argv: str, inside: bool = False) -> subprocess.CompletedProcess:
        cmd = [RAY, *argv]
        return subprocess.run(
            self.host.wrap(cmd) if inside else cmd, env=self.env, capture_output=True, text=True, timeout=180
        )

    def start(self) -> None:
        self.host.create()
        head = self.ray(
            "start", "--head", "--node-ip-address", self.host.host_ip, "--port", str(self.port),
            "--include-dashboard=false", "--num-cpus", "1", "--disable-usage-stats",
        )  # fmt: skip
        self.log.write((head.stdout + head.stderr).encode())
        assert head.returncode == 0, head.stderr[-3000:]
        node = self.ray(
            "start", "--address", self.address, "--node-ip-address", self.host.ns_ip, "--num-cpus", "1",
            "--disable-usage-stats", inside=True,
        )  # fmt: skip
        self.log.write((node.stdout + node.stderr).encode())
        assert node.returncode == 0, node.stderr[-3000:]

    def stop(self) -> None:
        for inside in (True, False):
            self.ray("stop", "--force", inside=inside)
        self.host.destroy()
        self.log.close()


@pytest.fixture(scope="module")
def ray_hosts(tmp):
    reason = ray_unavailable()
    if reason:
        pytest.skip(reason)
    hosts = RayHosts(tmp)
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()


def test_two_host_ray_cluster_forms_and_asks_for_its_token(ray_hosts):
    def two_nodes() -> bool:
        status = ray_hosts.ray("status", "--address", ray_hosts.address)
        assert status.returncode == 0, status.stderr[-2000:]
        active = status.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
        return active.count("node_") == 2 and "0.0/2.0 CPU" in status.stdout

    wait_until(two_nodes, 60, interval=1, what="two active Ray nodes")
    # Without the token, the cluster turns a client away.
    anonymous = subprocess.run(
        [RAY, "status", "--address", ray_hosts.address],
        env={**ray_hosts.env, "RAY_AUTH_TOKEN": "not-the-token"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert anonymous.returncode != 0


def test_managed_worker_joins_the_ray_cluster_where_vllm_cpu_refuses_the_ray_executor(tmp, ray_hosts):
    config = {
        # no restart within the test: the refusal is the same every time
        "supervisor": {"backoff_initial_s": 600, "backoff_max_s": 600, "stop_timeout_s": 30},
        "managed_workers": [
            {
                "model_name": "smollm2-ray", "model_path": smollm2_path(), "port": free_port(),
                "heartbeat_interval": INTERVAL, "ray_address": ray_hosts.address,
                "distributed_executor_backend": "ray", "pipeline_parallel_size": 2, "max_model_len": 1024,
                "compilation_config": COMPILATION,
            }
        ],
    }  # fmt: skip
    # The worker's engine is a Ray client of the cluster: it needs the cluster's token too.
    auth = {key: ray_hosts.env[key] for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED")}
    gateway = GatewayProc(tmp, config, name="gateway-ray", env={**engine_env(2), **auth})
    try:
        gateway.wait_up()
        wid = f"managed-smollm2-ray-{config['managed_workers'][0]['port']}"
        wait_until(lambda: gateway.workers()[wid]["last_exit"], ENGINE_START_S, interval=0.5, what="the Ray worker's exit")
        logged = gateway.log_text()
        # RAY_ADDRESS from ray_address: vLLM's engine joined our two-host cluster, with the token ...
        assert f"Connecting to existing Ray cluster at address: {ray_hosts.address}" in logged, logged[-4000:]
        assert "Connected to Ray cluster" in logged
        # ... and then vLLM's CPU platform refused the Ray executor. When this assertion fails,
        # vLLM's CPU build runs Ray: make this the full two-host serving test.
        assert "current platform cpu does not support ray" in logged, logged[-4000:]
        view = gateway.workers()[wid]
        assert view["last_exit"]["exit_code"] == 1 and not view.get("routable"), view
    finally:
        gateway.stop(60)
