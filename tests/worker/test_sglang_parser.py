"""The vLLM -> SGLang translation against both engines' real parsers.

Each case is a canonical (vLLM-named) command line. vLLM's own parser (in this venv) reads it as a
vLLM worker would; the SGLang plugin's real parse path (translation table, then SGLang's
``ServerArgs.add_cli_args`` / ``from_cli_args``) reads it in .venv-sglang-args, once for each
SGLang version the plugin supports (0.5.16, the oldest, and 0.5.23, the newest; each installed for
its parser only, ``make sglang-args-venv``). Both results are asserted.

Without that venv these tests fail, they do not skip: `make test` builds it first.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

from ichat.engines.args import TABLE
from tests.procs import models_dir, smollm2_path

REPO = Path(__file__).resolve().parents[2]
SGLANG_VENV = Path(os.environ.get("ICHAT_SGLANG_ARGS_VENV", REPO / ".venv-sglang-args"))
SGLANG_PYTHON = SGLANG_VENV / "bin" / "python"
PROBE = Path(__file__).with_name("sglang_parser_probe.py")
#: Oldest and newest supported (ichat.engines.sglang.SUPPORTED_VERSIONS); each in SGLANG_VENV/sglang-V.
SGLANG_VERSIONS = ("0.5.16", "0.5.23")

#: Table rows whose vLLM name the installed vLLM (0.32) no longer has: kept for older command lines.
LEGACY_VLLM_FLAGS = {"swap-space"}


@attrs.frozen
class Case:
    id: str
    argv: list[str]
    vllm: dict[str, Any]  # vLLM namespace attribute -> value
    sglang: dict[str, Any]  # ServerArgs field -> value
    served_model_name: list[str] | None = None
    warnings: tuple[str, ...] = ()  # flags that must be reported as ignored


#: A real model directory: SGLang 0.5.16 reads the model's config while it parses (0.5.23 does not).
MODEL = str(models_dir() / "smollm2-135m-instruct")
M = ["--model", MODEL]


@attrs.frozen
class Unset:
    """A field the translation leaves alone: SGLang 0.5.23's parser keeps it unset (None) and
    0.5.16's resolves it while parsing, to ``resolved_0516``."""

    resolved_0516: Any

    def expected(self, version: str) -> Any:
        return self.resolved_0516 if version == "0.5.16" else None

CASES = [
    Case("defaults", M,
         {"model": MODEL, "enable_prefix_caching": None, "enforce_eager": False},
         {"model_path": MODEL, "disable_radix_cache": False, "disable_decode_cuda_graph": False,
          "enable_metrics": True, "tp_size": 1, "served_model_name": Unset(MODEL)}),
    Case("gpu-memory", [*M, "--gpu-memory-utilization", "0.8"],
         {"gpu_memory_utilization": 0.8}, {"mem_fraction_static": 0.8}),
    Case("tp", [*M, "--tensor-parallel-size", "2"], {"tensor_parallel_size": 2}, {"tp_size": 2}),
    Case("short-aliases", [*M, "-tp", "2", "-pp", "2", "-dp", "2"],
         {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "data_parallel_size": 2},
         {"tp_size": 2, "pp_size": 2, "dp_size": 2}),
    Case("underscores-and-equals", [*M, "--tensor_parallel_size=4", "--max_num_seqs=64"],
         {"tensor_parallel_size": 4, "max_num_seqs": 64}, {"tp_size": 4, "max_running_requests": 64}),
    Case("prefix-caching-on", [*M, "--enable-prefix-caching"],
         {"enable_prefix_caching": True}, {"disable_radix_cache": False}),
    Case("prefix-caching-off", [*M, "--no-enable-prefix-caching"],
         {"enable_prefix_caching": False}, {"disable_radix_cache": True}),
    Case("eager", [*M, "--enforce-eager"],
         {"enforce_eager": True}, {"disable_decode_cuda_graph": True, "disable_prefill_cuda_graph": True}),
    Case("context", [*M, "--max-model-len", "4k"], {"max_model_len": 4000}, {"context_length": 4000}),
    Case("batching", [*M, "--max-num-seqs", "128", "--max-num-batched-tokens", "8192"],
         {"max_num_seqs": 128, "max_num_batched_tokens": 8192},
         {"max_running_requests": 128, "chunked_prefill_size": 8192}),
    Case("no-chunked-prefill", [*M, "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096"],
         {"enable_chunked_prefill": False, "max_num_batched_tokens": 4096},
         {"chunked_prefill_size": -1, "max_prefill_tokens": 4096}),
    Case("model-loading",
         [*M, "--tokenizer", "/tok", "--revision", "main", "--download-dir", "/dl", "--trust-remote-code",
          "--dtype", "bfloat16", "--load-format", "safetensors"],
         {"tokenizer": "/tok", "revision": "main", "download_dir": "/dl", "trust_remote_code": True,
          "dtype": "bfloat16"},
         {"tokenizer_path": "/tok", "revision": "main", "download_dir": "/dl", "trust_remote_code": True,
          "dtype": "bfloat16", "load_format": "safetensors"}),
    Case("quantization", [*M, "-q", "fp8", "--kv-cache-dtype", "fp8"],
         {"quantization": "fp8", "kv_cache_dtype": "fp8"}, {"quantization": "fp8", "kv_cache_dtype": "fp8_e4m3"}),
    Case("seed", [*M, "--seed", "7"], {"seed": 7}, {"random_seed": 7}),
    Case("serving", [*M, "--api-key", "secret", "--chat-template", "/t.jinja", "--enable-log-requests"],
         {"api_key": ["secret"], "chat_template": "/t.jinja", "enable_log_requests": True},
         {"api_key": "secret", "chat_template": "/t.jinja", "log_requests": True}),
    Case("lora",
         [*M, "--enable-lora", "--lora-modules", "sql=/loras/sql", "--max-loras", "4", "--max-lora-rank", "32",
          "--max-cpu-loras", "8"],
         {"enable_lora": True, "max_loras": 4, "max_lora_rank": 32, "max_cpu_loras": 8},
         {"enable_lora": True, "lora_paths": ["sql=/loras/sql"], "max_loras_per_batch": 4, "max_lora_rank": 32,
          "max_loaded_loras": 8}),
    Case("multi-node", [*M, "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "5000"],
         {"nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1", "master_port": 5000},
         {"nnodes": 2, "node_rank": 1, "dist_init_addr": "10.0.0.1:5000"}),
    Case("scheduling", [*M, "--scheduling-policy", "priority", "--stream-interval", "4"],
         {"scheduling_policy": "priority", "stream_interval": 4},
         {"schedule_policy": "priority", "stream_interval": 4}),
    Case("embedding", [*M, "--runner", "pooling"], {"runner": "pooling"}, {"is_embedding": True}),
    Case("hf-overrides", [*M, "--hf-overrides", '{"rope_theta": 1000}'],
         {"hf_overrides": {"rope_theta": 1000}}, {"json_model_override_args": '{"rope_theta": 1000}'}),
    Case("served-name-from-the-worker", M, {}, {"served_model_name": "smol"}, served_model_name=["smol"]),
    Case("vllm-only-knobs", [*M, "--block-size", "32", "--disable-log-stats"],
         {"block_size": 32, "disable_log_stats": True}, {"page_size": Unset(1)},
         warnings=("--block-size", "--disable-log-stats")),
]  # fmt: skip

#: SGLang-only flags: vLLM would not parse these, SGLang must.
PASSTHROUGH = Case(
    "sglang-only",
    [*M, "--schedule-policy", "lpm", "--chunked-prefill-size", "-1", "--cuda-graph-bs-decode", "1", "2"],
    {},
    {"schedule_policy": "lpm", "chunked_prefill_size": -1, "cuda_graph_bs_decode": [1, 2]},
)

#: Refused by the translation or by SGLang's parser: (id, argv, served names, words in the message).
REFUSALS = [
    (
        "speculative-config",
        [*M, "--speculative-config", '{"method": "ngram"}'],
        None,
        "--speculative-config has no SGLang equivalent",
    ),
    ("two-served-names", M, ["a", "b"], "SGLang serves a model under one name"),
    ("unknown-flag", [*M, "--no-such-flag", "1"], None, "unrecognized arguments: --no-such-flag 1"),
    (
        "both-names",
        [*M, "--tensor-parallel-size", "2", "--tp-size", "4"],
        None,
        "both --tensor-parallel-size and --tp-size",
    ),
    ("bad-choice", [*M, "--dtype", "int3"], None, "argument --dtype: invalid choice: 'int3'"),
    ("no-model", ["--dtype", "half"], None, "the following arguments are required: --model-path/--model"),
]


def run_sglang_parser(version: str, cases: list[tuple[list[str], list[str] | None]]) -> dict[str, Any]:
    smollm2_path()  # fails with how to build it when missing
    target = SGLANG_VENV / f"sglang-{version}"
    if not SGLANG_PYTHON.exists() or not target.is_dir():
        pytest.fail(f"{target} is missing: run `make sglang-args-venv` (scripts/setup_sglang_parser_venv.sh)")
    payload = json.dumps([{"argv": argv, "served_model_name": names} for argv, names in cases])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO)])}
    proc = subprocess.run(
        [str(SGLANG_PYTHON), "-W", "ignore", str(PROBE)],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module", params=SGLANG_VERSIONS)
def sglang(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Every case through one SGLang version's parser in one subprocess (importing SGLang takes seconds)."""
    all_cases = [*CASES, PASSTHROUGH]
    out = run_sglang_parser(
        request.param, [(c.argv, c.served_model_name) for c in all_cases] + [(a, n) for _, a, n, _ in REFUSALS]
    )
    assert out["version"] == request.param, "the probe imported another SGLang than the one asked for"
    results = out["results"]
    return {
        "version": out["version"],
        "options": set(out["options"]),
        "api": out["api"],
        "cases": dict(zip([c.id for c in all_cases], results[: len(all_cases)], strict=True)),
        "refusals": dict(zip([r[0] for r in REFUSALS], results[len(all_cases) :], strict=True)),
    }


def _vllm_parser() -> Any:
    """vLLM's full CLI parser (frontend + engine flags), where vLLM 0.32 or 0.26 keeps it."""
    for utils, cli in (
        ("vllm.utils.argparse_utils", "vllm.entrypoints.launchers.cli_args"),
        ("vllm.utils", "vllm.entrypoints.openai.cli_args"),
    ):
        try:
            flexible = importlib.import_module(utils).FlexibleArgumentParser
            make_arg_parser = importlib.import_module(cli).make_arg_parser
        except (ImportError, AttributeError):
            continue
        return make_arg_parser(flexible())
    pytest.fail("no vLLM argument parser found (vLLM 0.26 to 0.32 expected)")


@pytest.fixture(scope="module")
def vllm_parser() -> Any:
    return _vllm_parser()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_vllm_reads_the_canonical_flags(case: Case, vllm_parser: Any) -> None:
    ns = vllm_parser.parse_args(case.argv)
    for name, expected in case.vllm.items():
        assert getattr(ns, name) == expected, f"vLLM {name}"


@pytest.mark.parametrize("case", [*CASES, PASSTHROUGH], ids=lambda c: c.id)
def test_sglang_reads_the_translation(case: Case, sglang: dict[str, Any]) -> None:
    result = sglang["cases"][case.id]
    assert result["ok"], result.get("stderr", "")[-2000:]
    fields = result["fields"]
    for name, expected in case.sglang.items():
        if isinstance(expected, Unset):
            expected = expected.expected(sglang["version"])
        assert fields[name] == expected, f"SGLang {name} from {result['argv']}"
    assert [w.split(":")[0] for w in result["warnings"]] == list(case.warnings)


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda r: r[0])
def test_sglang_refusals_exit_2_with_a_message(
    refusal: tuple[str, list[str], Any, str], sglang: dict[str, Any]
) -> None:
    result = sglang["refusals"][refusal[0]]
    assert not result["ok"] and result["exit_code"] == 2
    assert refusal[3] in result["stderr"]
    assert len(result["stderr"].splitlines()) <= 3, "a short usage line, not SGLang's 500-line one"


def test_every_sglang_name_in_the_table_exists_in_sglang(sglang: dict[str, Any]) -> None:
    missing = {f"--{name}" for row in TABLE for name in row.sglang} - sglang["options"]
    assert not missing, f"not SGLang {sglang['version']} flags: {sorted(missing)}"


def test_every_entry_point_of_the_plugin_exists_in_sglang(sglang: dict[str, Any]) -> None:
    """Each of the plugin's API_LOCATIONS is defined where the table says, in this SGLang's source."""
    missing = [name for name, where in sglang["api"].items() if where is None]
    assert not missing, f"SGLang {sglang['version']} defines none of the locations listed for {missing}"


def test_the_tested_versions_are_the_supported_ones() -> None:
    from ichat.engines.sglang import SUPPORTED_VERSIONS

    assert SGLANG_VERSIONS == SUPPORTED_VERSIONS


def test_every_vllm_name_in_the_table_exists_in_vllm(vllm_parser: Any) -> None:
    options = {s for action in vllm_parser._actions for s in action.option_strings}
    wanted = {s for row in TABLE if row.vllm not in LEGACY_VLLM_FLAGS for s in (f"--{row.vllm}", *row.aliases)}
    assert not wanted - options, f"not vLLM flags: {sorted(wanted - options)}"
    assert not {f"--{name}" for name in LEGACY_VLLM_FLAGS} & options, (
        "a legacy flag is back in vLLM: drop it from LEGACY_VLLM_FLAGS"
    )


def test_sglang_parser_is_not_in_this_venv() -> None:
    """SGLang's torch pin would disturb vLLM's: it lives in .venv-sglang-args only."""
    assert importlib.util.find_spec("sglang") is None, sys.prefix
