"""The ``ichat`` command against a real gateway process (``python -m ichat.gateway``) over real HTTP.

Workers use the stub engine (``--backend stub``): these tests are about the command line, the
admin API and the log transport, not about generating text. The stub's child process prints
``stub engine line N`` every 0.1 s, which gives the log tests a steady, numbered stream.
One gateway (admin key and client key set) serves the whole module.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests.gateway_proc import GatewayProc
from tests.procs import REPO, TcpRelay, free_port, wait_until

ADMIN_KEY = "admin-secret"
CLIENT_KEY = "client-secret"
MODEL = "stubby"
#: the console script `pip install` puts beside the interpreter
ICHAT = Path(sys.executable).parent / "ichat"


def cli_env(gateway_url: str | None, admin_key: str | None = ADMIN_KEY, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICHAT_") or k == "ICHAT_MODELS_DIR"}
    if gateway_url:
        env["ICHAT_GATEWAY"] = gateway_url
    if admin_key:
        env["ICHAT_ADMIN_KEY"] = admin_key
    env.update(extra)
    return env


def ichat(*args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ICHAT), *args], env=env, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def admin_workers(gateway: GatewayProc) -> dict[str, dict]:
    resp = httpx.get(gateway.base_url + "/v1/admin/workers", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    return {w["worker_id"]: w for w in resp.json()["data"]}


def admin_worker(gateway: GatewayProc, worker_id: str) -> dict:
    resp = httpx.get(f"{gateway.base_url}/v1/admin/workers/{worker_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The failure contract: non-zero exit, nothing on stdout, one line on stderr, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ichat: ")
    return lines[0]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def gateway(tmp):
    worker_port = free_port()
    config = {
        "auth": {"admin_key": ADMIN_KEY, "api_keys": [CLIENT_KEY]},
        "registry": {"probe_interval_s": 0.5},
        "supervisor": {"backoff_initial_s": 0.2, "stop_timeout_s": 10},
        "managed_workers": [
            {
                "model_name": MODEL, "model_path": "stub-model", "backend": "stub", "port": worker_port,
                "heartbeat_interval": 0.5, "stub_log_interval": 0.1,
            }
        ],
    }  # fmt: skip
    proc = GatewayProc(tmp, config)
    proc.wait_up()
    proc.managed_id = f"managed-{MODEL}-{worker_port}"
    env = cli_env(proc.base_url)
    wait_until(lambda: '"routable": true' in ichat("workers", "--json", env=env).stdout, 30, interval=0.2, what="stub ready")
    yield proc
    proc.stop()


@pytest.fixture
def env(gateway):
    return cli_env(gateway.base_url)


def test_the_console_script_and_python_m_ichat_are_the_same_command(env):
    assert ICHAT.is_file(), f"{ICHAT} missing: `pip install -e .` installs the console script"
    script = ichat("--help", env=env)
    module = subprocess.run([sys.executable, "-m", "ichat", "--help"], env=env, capture_output=True, text=True, timeout=30)
    assert script.returncode == module.returncode == 0
    assert script.stdout == module.stdout
    for command in ("gateway", "worker", "status", "workers", "models", "logs", "launch", "stop", "reload", "chat"):
        assert f"    {command} " in script.stdout


def test_workers_table_shows_the_managed_worker(gateway, env):
    result = ichat("workers", env=env)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.strip().splitlines()
    assert header.split() == ["WORKER", "STATE", "MODEL", "BACKEND", "ADDRESS", "GPUS", "LOAD", "HEARTBEAT", "RESTARTS"]
    row = next(r for r in rows if r.startswith(gateway.managed_id))
    assert re.search(rf"{gateway.managed_id}\s+ready\s+{MODEL}\s+stub\s+http://127\.0\.0\.1:\d+\s+-\s+0 run / 0 wait\s+\d+\.\ds ago\s+0$", row), row


def test_workers_json_is_the_admin_api_answer(gateway, env):
    result = ichat("workers", "--json", env=env)
    assert result.returncode == 0, result.stderr
    views = {v["worker_id"]: v for v in orjson.loads(result.stdout)}
    view = views[gateway.managed_id]
    assert view["source"] == "managed" and view["state"] == "ready" and view["backend"] == "stub"
    assert view["restarts"] == 0 and isinstance(view["heartbeat_age_s"], float)


def test_status_and_models(gateway, env):
    status = ichat("status", env=env)
    assert status.returncode == 0, status.stderr
    assert f"gateway  {gateway.base_url}  up " in status.stdout
    assert "workers  1: 1 ready" in status.stdout
    assert re.search(rf"^{MODEL}\s+1\s+1\s+{gateway.managed_id}$", status.stdout, re.M), status.stdout
    models = ichat("models", env=env)
    assert models.stdout.split("\n")[0].split() == ["MODEL", "REPLICAS", "ROUTABLE", "WORKERS"]
    assert orjson.loads(ichat("models", "--json", env=env).stdout) == {MODEL: {"replicas": 1, "routable": 1}}
    as_json = orjson.loads(ichat("status", "--json", env=env).stdout)
    assert as_json["status"]["workers"]["by_state"] == {"ready": 1}
    assert [w["worker_id"] for w in as_json["workers"]] == [gateway.managed_id]


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"stub engine line (\d+)$", text, re.M)]


def test_logs_of_one_worker_tail(gateway, env):
    result = ichat("logs", gateway.managed_id, "--tail", "3", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    got = numbers(result.stdout)
    assert got == list(range(got[0], got[0] + len(got))), lines


def test_logs_of_all_workers_are_tagged_and_console_source_works(gateway, env):
    result = ichat("logs", "--tail", "5", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5 and all(l.startswith(f"[{gateway.managed_id}] ") for l in lines), lines
    console = ichat("logs", gateway.managed_id, "--tail", "5", "--source", "console", env=env)
    assert console.returncode == 0 and len(numbers(console.stdout)) >= 3, console.stdout


class FollowedCli:
    """``ichat logs -f`` running in the background; its output collected by reader threads."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.popen = subprocess.Popen([str(ICHAT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.popen.stdout, self.out), (self.popen.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: [k.append(l) for l in s], daemon=True).start()

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(10)


@pytest.mark.parametrize("one_worker", [True, False], ids=["one-worker", "all-workers"])
def test_logs_follow_resumes_after_a_dropped_connection_without_loss_or_repeats(gateway, env, one_worker):
    relay = TcpRelay(("127.0.0.1", free_port()), ("127.0.0.1", gateway.port))
    relayed = {**env, "ICHAT_GATEWAY": f"http://127.0.0.1:{relay._server.getsockname()[1]}"}
    which = [gateway.managed_id] if one_worker else []
    prefix = "" if one_worker else f"[{gateway.managed_id}] "

    def followed() -> list[int]:
        text = "".join(l[len(prefix) :] for l in cli.out if l.startswith(prefix))
        return numbers(text)

    cli = FollowedCli("logs", *which, "-f", "--tail", "1", env=relayed)
    try:
        wait_until(lambda: len(followed()) >= 5, 20, what="5 followed lines")
        assert relay.cut() == 1
        before = len(followed())
        wait_until(lambda: "reconnecting" in "".join(cli.err), 20, what="the CLI noticing the drop")
        wait_until(lambda: len(followed()) >= before + 10, 20, what="lines after the reconnect")
        assert relay.accepted >= 2  # it really came back through a second connection
    finally:
        cli.stop()
        relay.close()
    got = followed()
    assert got == list(range(got[0], got[0] + len(got))), f"lost or repeated lines: {got}"


def test_launch_then_stop_a_worker(gateway, env):
    port = free_port()
    worker_id = f"managed-cli-launched-{port}"
    launched = ichat(
        "launch", "--model-name", "cli-launched", "--model-path", "stub-model", "--port", str(port),
        "--backend", "stub", "--heartbeat-interval", "0.5", "--stub-log-interval", "0.5", "--stub-chunks", "3", env=env,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout == f"launched {worker_id}; follow its start with `ichat logs {worker_id} -f`\n"
    wait_until(lambda: admin_workers(gateway).get(worker_id, {}).get("routable"), 30, interval=0.2, what="launched ready")
    spec = admin_worker(gateway, worker_id)["spec"]
    assert spec["engine_flags"] == {"stub_log_interval": "0.5", "stub_chunks": "3"}  # engine flags in vLLM naming
    stopped = ichat("stop", worker_id, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"{worker_id}: stopped and removed"
    assert worker_id not in admin_workers(gateway)


def test_launch_with_a_bad_spec_says_what_is_wrong(env):
    result = ichat("launch", "--model-name", "x", "--model-path", "p", "--port", "70000", env=env)
    line = one_error_line(result)
    assert "launch: 422" in line and "port" in line
    not_a_flag = ichat("launch", "--model-name", "x", "--model-path", "p", "--port", "1", "stray", env=env)
    assert not_a_flag.returncode == 2 and "expected an engine flag" in not_a_flag.stderr


def test_reload(gateway, env):
    result = ichat("reload", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "config applied; started: -; stopped: -; restarted: -; routes: 0"


def sdk_stream_text(gateway: GatewayProc, prompt: str) -> str:
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_chat_streams_the_answer(gateway, env):
    result = ichat("chat", MODEL, "Hello there", env={**env, "ICHAT_API_KEY": CLIENT_KEY})
    assert result.returncode == 0, result.stderr
    expected = sdk_stream_text(gateway, "Hello there")
    assert expected and result.stdout == expected + "\n"


def test_chat_without_a_prompt_is_a_conversation_on_stdin(gateway, env):
    result = ichat("chat", MODEL, env={**env, "ICHAT_API_KEY": CLIENT_KEY}, stdin="first question\nsecond one\n")
    assert result.returncode == 0, result.stderr
    answer = sdk_stream_text(gateway, "first question")
    assert result.stdout == f"{answer}\n{answer}\n"  # the stub answers every turn alike


def test_worker_command_runs_a_worker_that_registers(gateway, tmp, env):
    port = free_port()
    log = open(tmp / "cli-worker.log", "wb")
    worker = subprocess.Popen(
        [str(ICHAT), "worker", "--backend", "stub", "--model", "m", "--served-model-name", "by-hand", "--port", str(port),
         "--gateway-address", gateway.base_url, "--heartbeat-interval", "0.5", "--worker-id", "cli-hand"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        wait_until(lambda: admin_workers(gateway).get("cli-hand", {}).get("routable"), 30, interval=0.2, what="cli-hand")
        row = next(r for r in ichat("workers", env=env).stdout.splitlines() if r.startswith("cli-hand "))
        assert re.search(rf"cli-hand\s+ready\s+by-hand\s+stub\s+http://127\.0\.0\.1:{port}", row), row
    finally:
        worker.terminate()
        assert worker.wait(20) == 0
        log.close()


def test_gateway_command_serves_and_stops_cleanly(tmp, env):
    port = free_port()
    config = tmp / "plain.yaml"
    config.write_text(f"server_settings: {{host: 127.0.0.1, port: {port}}}\nstate_dir: {tmp / 'plain-state'}\n")
    with open(tmp / "plain-gateway.log", "wb") as log:
        proc = subprocess.Popen([str(ICHAT), "gateway", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200, 30, what="ichat gateway up")
            workers = ichat("workers", "--json", env={**env, "ICHAT_GATEWAY": f"http://127.0.0.1:{port}"})
            assert workers.returncode == 0 and orjson.loads(workers.stdout) == []
        finally:
            proc.terminate()
            assert proc.wait(20) == 0


def test_gateway_command_reports_a_bad_config_like_python_m_ichat_gateway(tmp, env):
    bad = tmp / "bad.yaml"
    bad.write_text("routing:\n  timeouts:\n    connect_s: soon\n")
    result = ichat("gateway", "--config", str(bad), env=env)
    assert result.returncode == 2
    assert "connect_s" in result.stderr and "Traceback" not in result.stderr


# -- errors: one line, the setting to fix, non-zero exit ------------------------------------------


def test_unreachable_gateway(env):
    port = free_port()  # nothing listens there
    line = one_error_line(ichat("workers", env={**env, "ICHAT_GATEWAY": f"http://127.0.0.1:{port}"}))
    assert line == f"ichat: cannot reach the gateway at http://127.0.0.1:{port} (Connection refused); set --gateway or ICHAT_GATEWAY"
    follow = one_error_line(ichat("logs", "-f", env={**env, "ICHAT_GATEWAY": f"http://127.0.0.1:{port}"}))
    assert "cannot reach the gateway" in follow


def test_a_gateway_address_that_is_not_a_url(env):
    result = ichat("workers", env={**env, "ICHAT_GATEWAY": "gw:4000"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "ichat: the gateway address must be a URL like http://host:4000, got 'gw:4000'; set --gateway or ICHAT_GATEWAY"


def test_a_server_that_is_not_an_ichat_gateway(gateway, env):
    # "/health?" turns every path after it into a query: the JSON that comes back is not the admin API's
    url = gateway.base_url + "/health?"
    line = one_error_line(ichat("workers", env={**env, "ICHAT_GATEWAY": url}))
    assert line == f"ichat: workers: unexpected answer from {url} (missing 'data'); is it an iChat gateway?"


def test_a_reader_that_goes_away_is_not_an_error(gateway, env):
    proc = subprocess.Popen([str(ICHAT), "logs", "-f", "--tail", "1000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(100)  # some lines came
    proc.stdout.close()  # `| head` ends
    assert proc.wait(20) == 0
    assert proc.stderr.read() == b""


@pytest.mark.parametrize("command", [["workers"], ["status"], ["models"], ["logs", "--tail", "1"], ["reload"], ["stop", "x"]])
def test_missing_admin_key_names_the_setting(gateway, command):
    line = one_error_line(ichat(*command, env=cli_env(gateway.base_url, admin_key=None)))
    assert ": 401 " in line and "no admin key was sent" in line and "ICHAT_ADMIN_KEY" in line, line


def test_wrong_admin_key_names_the_setting(gateway):
    line = one_error_line(ichat("workers", env=cli_env(gateway.base_url, admin_key="wrong")))
    assert ": 401 " in line and "the admin key was refused" in line and "--admin-key or ICHAT_ADMIN_KEY" in line, line
    flag = ichat("--admin-key", ADMIN_KEY, "workers", env=cli_env(gateway.base_url, admin_key="wrong"))
    assert flag.returncode == 0, flag.stderr  # the flag wins over the environment


def test_unknown_worker(env):
    assert one_error_line(ichat("stop", "no-such-worker", env=env)) == "ichat: no worker 'no-such-worker' (see `ichat workers`)"
    logs = one_error_line(ichat("logs", "no-such-worker", env=env))
    assert logs == "ichat: no logs of a worker 'no-such-worker' at this gateway (see `ichat workers`)"


def test_chat_errors(gateway, env):
    line = one_error_line(ichat("chat", MODEL, "hi", env=env))  # the admin key is not a client key here
    assert ": 401 " in line and "ICHAT_API_KEY" in line, line
    unknown = one_error_line(ichat("chat", "no-such-model", "hi", env={**env, "ICHAT_API_KEY": CLIENT_KEY}))
    assert "chat: 404" in unknown and "no-such-model" in unknown


def test_gateway_start_prints_progress_and_a_ready_block(gateway):
    log = gateway.log_text()
    wid = gateway.managed_id
    assert f"ichat ▸ {wid}: starting" in log
    assert re.search(rf"ichat ▸ {wid}: iChat worker {wid} listening on http://127\.0\.0\.1:\d+ \(backend stub", log)
    assert re.search(rf"ichat ▸ {wid}: ready \(after \d+\.\ds\)", log)
    block = log[log.index(f"ichat ▸ ready: {MODEL} at {gateway.base_url}/v1") :]
    assert f"  curl {gateway.base_url}/v1/chat/completions" in block
    assert "Bearer $ICHAT_API_KEY" in block  # this gateway needs a client key
    assert f'OpenAI(base_url="{gateway.base_url}/v1", api_key=os.environ["ICHAT_API_KEY"])' in block
    assert log.count("ichat ▸ ready:") == 1
