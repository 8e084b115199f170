"""``python -m ichat.gateway`` as a real process: starts, says where it listens, stops on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path


def test_gateway_process_serves_and_stops_cleanly(tmp_path: Path):
    config = tmp_path / "gateway.yaml"
    config.write_text("server_settings: {host: 127.0.0.1}\nlitellm_settings: {drop_params: true}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ichat.gateway", "--config", str(config), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:  # ends if the process dies: then the assert below says why
            lines.append(line)
            if "listening on" in line:
                break
        match = re.search(r"iChat gateway listening on (http://127\.0\.0\.1:\d+)", "".join(lines))
        assert match, "".join(lines)
        assert any("litellm_settings ignored" in line for line in lines)
        with urllib.request.urlopen(match.group(1) + "/health", timeout=5) as resp:
            assert resp.read() == b'{"status":"ok"}'
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
