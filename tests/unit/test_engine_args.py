"""The vLLM-name -> SGLang translation table, as pure values (no engine, no parser).

The same translations are checked against SGLang's and vLLM's real parsers in
tests/worker/test_sglang_parser.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ichat.engines import args as engine_args
from ichat.engines.args import TABLE, Row, describe, human_readable_int, markdown_table, to_sglang
from ichat.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

#: What the issue (7) asks the table to cover: vLLM name -> SGLang name(s).
REQUIRED = {
    "model": ("model-path",),
    "tokenizer": ("tokenizer-path",),
    "served-model-name": ("served-model-name",),
    "tensor-parallel-size": ("tp-size",),
    "pipeline-parallel-size": ("pp-size",),
    "data-parallel-size": ("dp-size",),
    "gpu-memory-utilization": ("mem-fraction-static",),
    "max-model-len": ("context-length",),
    "max-num-seqs": ("max-running-requests",),
    "max-num-batched-tokens": ("chunked-prefill-size",),
    "enable-prefix-caching": ("disable-radix-cache",),
    "enforce-eager": ("disable-decode-cuda-graph", "disable-prefill-cuda-graph"),
    "seed": ("random-seed",),
    "dtype": ("dtype",),
    "kv-cache-dtype": ("kv-cache-dtype",),
    "quantization": ("quantization",),
    "trust-remote-code": ("trust-remote-code",),
    "revision": ("revision",),
    "download-dir": ("download-dir",),
    "api-key": ("api-key",),
    "chat-template": ("chat-template",),
    "enable-lora": ("enable-lora",),
    "lora-modules": ("lora-paths",),
    "nnodes": ("nnodes",),
    "node-rank": ("node-rank",),
    "master-addr": ("dist-init-addr",),
    "master-port": ("dist-init-addr",),
}


def argv_of(*args: str) -> list[str]:
    return to_sglang(list(args)).argv


def row(name: str) -> Row:
    return next(r for r in TABLE if r.vllm == name)


# --- the table itself ------------------------------------------------------------------------


@pytest.mark.parametrize("vllm_name", sorted(REQUIRED))
def test_table_covers_what_the_issue_asks(vllm_name: str) -> None:
    assert row(vllm_name).sglang == REQUIRED[vllm_name]


def test_rows_are_unique_and_well_formed() -> None:
    names = [r.vllm for r in TABLE]
    assert len(names) == len(set(names))
    for r in TABLE:
        assert not r.vllm.startswith("-") and r.vllm == r.vllm.lower() and "_" not in r.vllm
        assert all(not s.startswith("-") for s in r.sglang)
        assert r.takes in ("flag", "value", "values")
        assert describe(r.transform), f"{r.vllm}: its transform needs a docstring for the README"
        if r.transform in (engine_args.ignored, engine_args.refused):
            assert not r.sglang and r.note, f"{r.vllm}: a vLLM-only row says why in its note"
        else:
            assert r.sglang, f"{r.vllm}: a translated row names its SGLang flag"


def test_every_row_translates_or_reports() -> None:
    """Each row, given alone, either emits only its SGLang names, warns, or refuses."""
    samples = {"flag": [], "value": ["1"], "values": ["a=/p"]}
    for r in TABLE:
        argv = [f"--{r.vllm}", *samples[r.takes]]
        if r.vllm in ("runner", "convert"):
            argv = [f"--{r.vllm}", "pooling"]
        if r.vllm == "enable-chunked-prefill":
            argv = ["--no-enable-chunked-prefill"]
        if r.vllm == "enable-prefix-caching":
            argv = ["--no-enable-prefix-caching"]
        if r.transform is engine_args.refused:
            with pytest.raises(ConfigError, match=f"--{r.vllm} has no SGLang equivalent"):
                to_sglang(argv)
            continue
        result = to_sglang(argv)
        if r.transform is engine_args.ignored:
            assert result.argv == [] and len(result.warnings) == 1 and f"--{r.vllm}" in result.warnings[0]
            continue
        emitted = {t[2:] for t in result.argv if t.startswith("--")}
        assert emitted and emitted <= set(r.sglang) | {"max-prefill-tokens"}, (r.vllm, result.argv)


def test_markdown_table_has_one_line_per_row() -> None:
    lines = markdown_table().splitlines()
    assert len(lines) == 2 + len(TABLE)
    assert (
        "| `--gpu-memory-utilization` `--device-memory-utilization` | `--mem-fraction-static` |"
        in lines[2 + TABLE.index(row("gpu-memory-utilization"))]
    )


def test_docs_show_the_current_table() -> None:
    """README.md carries the generated table; regenerate it with scripts/print_arg_table.py --write."""
    assert markdown_table() in (REPO / "README.md").read_text(encoding="utf-8")


# --- reading the command line ----------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        ["--tensor-parallel-size", "2"],
        ["--tensor-parallel-size=2"],
        ["--tensor_parallel_size", "2"],
        ["--tensor_parallel_size=2"],
        ["-tp", "2"],
    ],
)
def test_spellings_of_one_flag(spelling: list[str]) -> None:
    assert argv_of(*spelling) == ["--tp-size", "2"]


def test_a_typical_worker_command_line() -> None:
    result = to_sglang(
        [
            "--model", "/models/smol", "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.8",
            "--max-model-len", "2048", "--enforce-eager", "--enable-prefix-caching", "--seed", "7",
        ]
    )  # fmt: skip
    assert result.argv == [
        "--model-path", "/models/smol", "--mem-fraction-static", "0.8", "--context-length", "2048",
        "--random-seed", "7", "--disable-decode-cuda-graph", "--disable-prefill-cuda-graph", "--tp-size", "2",
    ]  # fmt: skip
    assert result.warnings == []


def test_sglang_only_flags_pass_through_unchanged() -> None:
    assert argv_of("--model", "/m", "--schedule-policy", "lpm", "--cuda-graph-bs-decode", "1", "2", "4") == [
        "--model-path", "/m", "--schedule-policy", "lpm", "--cuda-graph-bs-decode", "1", "2", "4",
    ]  # fmt: skip
    assert argv_of("--schedule_policy=lpm") == ["--schedule-policy=lpm"]
    assert argv_of("--chunked-prefill-size", "-1") == ["--chunked-prefill-size", "-1"]  # a negative value is a value


def test_a_bare_argument_is_refused() -> None:
    with pytest.raises(ConfigError, match="unexpected argument '/m'"):
        to_sglang(["/m", "--dtype", "half"])


def test_value_flags_need_one_value() -> None:
    with pytest.raises(ConfigError, match="--max-num-seqs expects a value"):
        to_sglang(["--max-num-seqs"])
    with pytest.raises(ConfigError, match="expects one value"):
        to_sglang(["--max-num-seqs", "8", "16"])


def test_boolean_flags_take_no_value() -> None:
    with pytest.raises(ConfigError, match="takes no value"):
        to_sglang(["--enforce-eager=true"])


def test_last_spelling_wins_like_argparse() -> None:
    assert argv_of("--seed", "1", "--seed=2") == ["--random-seed", "2"]


def test_same_setting_under_both_names_is_an_error() -> None:
    with pytest.raises(ConfigError, match="both --tensor-parallel-size and --tp-size"):
        to_sglang(["--tensor-parallel-size", "2", "--tp-size", "4"])
    with pytest.raises(ConfigError, match="both --enable-prefix-caching and --disable-radix-cache"):
        to_sglang(["--enable-prefix-caching", "--disable-radix-cache"])


# --- the decisions ---------------------------------------------------------------------------


def test_prefix_caching_absent_emits_nothing() -> None:
    """vLLM V1 and SGLang both cache prefixes by default: nothing to say."""
    assert argv_of("--model", "/m") == ["--model-path", "/m"]
    assert argv_of("--enable-prefix-caching") == []
    assert argv_of("--no-enable-prefix-caching") == ["--disable-radix-cache"]
    assert argv_of("--no_enable_prefix_caching") == ["--disable-radix-cache"]


def test_boolean_flags_and_their_negations() -> None:
    assert argv_of("--trust-remote-code") == ["--trust-remote-code"]
    assert argv_of("--no-trust-remote-code") == []
    assert argv_of("--no-enforce-eager") == []
    assert argv_of("--enable-lora") == ["--enable-lora"]


def test_vllm_only_performance_flags_are_dropped_with_a_warning() -> None:
    result = to_sglang(["--model", "/m", "--block-size", "32", "--swap-space", "4", "--disable-log-stats"])
    assert result.argv == ["--model-path", "/m"]
    assert [w.split(":")[0] for w in result.warnings] == ["--block-size", "--swap-space", "--disable-log-stats"]
    assert "ignored for SGLang" in result.warnings[0]


def test_host_and_port_are_the_workers() -> None:
    result = to_sglang(["--host", "0.0.0.0", "--port", "9000"])
    assert result.argv == [] and len(result.warnings) == 2


def test_flags_that_change_answers_are_refused_with_the_sglang_way() -> None:
    with pytest.raises(ConfigError, match="--speculative-algorithm") as info:
        to_sglang(["--speculative-config", '{"method": "ngram"}'])
    assert info.value.param == "speculative-config"
    with pytest.raises(ConfigError, match="--ep-size"):
        to_sglang(["--enable-expert-parallel"])
    with pytest.raises(ConfigError, match="--master-addr"):
        to_sglang(["--data-parallel-address", "10.0.0.1"])


def test_several_values_where_sglang_takes_one() -> None:
    assert argv_of("--served-model-name", "smol") == ["--served-model-name", "smol"]
    with pytest.raises(ConfigError, match="2 values"):
        to_sglang(["--served-model-name", "a", "b"])
    with pytest.raises(ConfigError, match="takes exactly one"):
        to_sglang(["--api-key", "k1", "k2"])


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "5000"],
         ["--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "10.0.0.1:5000"]),
        (["--master-addr", "10.0.0.1"], ["--dist-init-addr", "10.0.0.1:29501"]),
        (["--master-port", "5000"], ["--dist-init-addr", "127.0.0.1:5000"]),
        (["--master-port", "5000", "--master-addr", "fd00::1"], ["--dist-init-addr", "[fd00::1]:5000"]),
        (["-r", "3"], ["--node-rank", "3"]),
    ],
)  # fmt: skip
def test_distributed_flags(given: list[str], expected: list[str]) -> None:
    assert argv_of(*given) == expected


def test_token_counts_accept_vllm_suffixes() -> None:
    assert argv_of("--max-model-len", "4k") == ["--context-length", "4000"]
    assert argv_of("--max-model-len", "32K") == ["--context-length", "32768"]
    assert argv_of("--max-num-batched-tokens", "8k") == ["--chunked-prefill-size", "8000"]
    with pytest.raises(ConfigError, match="whole number"):
        to_sglang(["--max-model-len", "long"])


@pytest.mark.parametrize(
    ("text", "value"), [("7", 7), ("1k", 1000), ("1K", 1024), ("25.6k", 25600), ("2M", 2 * 2**20), ("1g", 10**9)]
)
def test_human_readable_int_matches_vllm(text: str, value: int) -> None:
    assert human_readable_int(text, row("max-model-len")) == value


def test_binary_suffix_refuses_decimals_like_vllm() -> None:
    with pytest.raises(ConfigError, match="no decimals"):
        human_readable_int("1.5K", row("max-model-len"))


def test_auto_context_length_is_left_to_sglang_with_a_warning() -> None:
    result = to_sglang(["--max-model-len", "auto"])
    assert result.argv == [] and "model's own length" in result.warnings[0]
    assert to_sglang(["--max-model-len", "-1"]).argv == []


def test_chunked_prefill_off() -> None:
    assert argv_of("--no-enable-chunked-prefill") == ["--chunked-prefill-size", "-1"]
    assert argv_of("--enable-chunked-prefill") == []
    assert argv_of("--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096") == [
        "--max-prefill-tokens", "4096", "--chunked-prefill-size", "-1",
    ]  # fmt: skip


def test_kv_cache_dtype_names() -> None:
    assert argv_of("--kv-cache-dtype", "fp8") == ["--kv-cache-dtype", "fp8_e4m3"]
    assert argv_of("--kv-cache-dtype", "fp8_e5m2") == ["--kv-cache-dtype", "fp8_e5m2"]


def test_lora_modules_become_lora_paths() -> None:
    result = to_sglang(
        [
            "--enable-lora",
            "--lora-modules",
            "sql=/loras/sql",
            '{"name": "chat", "path": "/loras/chat", "base_model_name": "m"}',
        ]
    )
    assert result.argv[:4] == ["--enable-lora", "--lora-paths", "sql=/loras/sql", result.argv[3]]
    assert json.loads(result.argv[3]) == {"lora_name": "chat", "lora_path": "/loras/chat"}
    assert "base_model_name" in result.warnings[0]
    with pytest.raises(ConfigError, match="name=path or JSON"):
        to_sglang(["--lora-modules", "/just/a/path"])
    with pytest.raises(ConfigError, match="'name' and 'path'"):
        to_sglang(["--lora-modules", '{"path": "/p"}'])


def test_pooling_runner_means_an_embedding_model() -> None:
    assert argv_of("--runner", "pooling") == ["--is-embedding"]
    assert argv_of("--convert", "embed") == ["--is-embedding"]
    assert argv_of("--runner", "generate") == []
    with pytest.raises(ConfigError, match="--runner draft"):
        to_sglang(["--runner", "draft"])


def test_hf_overrides_become_sglang_model_overrides() -> None:
    assert argv_of("--hf-overrides", '{"rope_theta": 1000}') == ["--json-model-override-args", '{"rope_theta": 1000}']
