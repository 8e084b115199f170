"""Answers of any size through a real gateway process, on both upstream paths.

The gateway relays a non-streaming answer whole when it is small enough and in pieces when it
is large; both have to work at every size, including the band where the read buffer's
back-pressure limit (256 KB) and the whole-body limit (4 MB) meet, which once hung (1 MB and
3 MB answers never arrived). The upstream is ``tests/answer_server.py`` in its own process,
once over plain HTTP (the gateway's own keep-alive client) and once over HTTPS with a
throw-away certificate (the aiohttp fallback).
"""

from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.gateway_proc import GatewayProc
from tests.procs import Proc, free_port, wait_until

SIZES = {"100KB": 100 * 2**10, "1MB": 2**20, "3MB": 3 * 2**20, "16MB": 16 * 2**20}


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProc]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is missing: cannot make the HTTPS upstream's certificate")
    tmp = tmp_path_factory.mktemp("answers")
    cert, key = make_certificate(tmp)
    plain_port, tls_port = free_port(), free_port()
    script = str(Path(__file__).resolve().parent.parent / "answer_server.py")
    servers = [
        Proc([sys.executable, script, "--port", str(plain_port)], tmp / "plain.log"),
        Proc([sys.executable, script, "--port", str(tls_port), "--tls-cert", str(cert), "--tls-key", str(key)], tmp / "tls.log"),
    ]
    config = {
        "routes": [
            {"model_name": "plain", "api_base": f"http://127.0.0.1:{plain_port}/v1"},
            {"model_name": "tls", "api_base": f"https://127.0.0.1:{tls_port}/v1"},
        ],
        "routing": {"timeouts": {"first_byte_s": 30}},
    }
    # OpenSSL's default verify paths honour SSL_CERT_FILE: the gateway trusts our certificate.
    gw = GatewayProc(tmp, config, env={"SSL_CERT_FILE": str(cert)})
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{plain_port}/health", timeout=2).status_code == 200, 20, what="plain upstream")
        wait_until(lambda: httpx.get(f"https://127.0.0.1:{tls_port}/health", timeout=2, verify=ssl.create_default_context(cafile=str(cert))).status_code == 200, 20, what="tls upstream")
        gw.wait_up()
        yield gw
    finally:
        gw.stop()
        for server in servers:
            server.stop()


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("model", ["plain", "tls"], ids=["small-client", "aiohttp-fallback"])
def test_answer_of_any_size_arrives_whole(gateway: GatewayProc, model: str, size: int) -> None:
    # A hang shows as a read timeout well before the gateway's own 30 s first-byte limit.
    response = httpx.post(
        gateway.base_url + "/v1/embeddings", json={"model": model, "answer_bytes": size}, timeout=httpx.Timeout(15.0)
    )

    assert response.status_code == 200, response.text[:500]
    assert int(response.headers["Content-Length"]) == size == len(response.content)
    answer = orjson.loads(response.content)
    assert answer["sha256"] == hashlib.sha256(answer["fill"].encode()).hexdigest()
