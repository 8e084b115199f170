"""Canonical engine flags (vLLM's names) -> SGLang flags: one table and the pure function applying it.

iChat's standard (seed principle 5) is vLLM's flag names: a worker, or a ``managed_workers``
entry, says ``--tensor-parallel-size 2 --gpu-memory-utilization 0.8`` whatever its backend.
For ``--backend sglang`` the plugin runs :func:`to_sglang` on those flags, then hands the result
to SGLang's own parser, which has the last word on every value.

What happens to a flag::

    in TABLE, with SGLang names     rewritten (name, and value where the row says so)
    in TABLE, IGNORED               dropped with a warning: it tunes only vLLM's own machinery
                                    (KV block layout, swap, vLLM's HTTP server, ...), so dropping
                                    it changes speed or memory, never what the model answers
    in TABLE, REFUSED               error: it changes what is served or answered (speculative
                                    config, generation defaults, vLLM-style multi-node data
                                    parallel); the message names the SGLang flag to use instead
    not in TABLE                    passed through unchanged (underscores become dashes), so
                                    every SGLang-only flag works (``--schedule-policy lpm``);
                                    SGLang's parser rejects what it does not know, in its words

Decisions worth knowing:

- **Prefix caching.** vLLM V1 enables prefix caching by default and SGLang enables its radix
  cache by default, so an absent flag emits nothing and both engines cache prefixes.
  ``--enable-prefix-caching`` emits nothing either (already SGLang's default);
  ``--no-enable-prefix-caching`` becomes ``--disable-radix-cache``.
- **Eager mode.** ``--enforce-eager`` becomes ``--disable-decode-cuda-graph
  --disable-prefill-cuda-graph``: SGLang 0.5.23 deprecated ``--disable-cuda-graph`` in favour of
  the per-phase switches, and the two booleans set the same thing without the warning.
- **Distributed.** vLLM (0.32) has ``--nnodes``, ``--node-rank``/``-r``, ``--master-addr`` and
  ``--master-port`` for multi-node TP/PP; SGLang has ``--nnodes``, ``--node-rank`` and
  ``--dist-init-addr HOST:PORT``. The first two keep their names; the last two are joined into
  ``--dist-init-addr``, vLLM's defaults (127.0.0.1, 29501) filling a missing half. vLLM's
  multi-node *data parallel* flags (``--data-parallel-address``, ``--headless``, ...) are refused.
  (vLLM's ``-n`` for ``--nnodes`` is not read here: the worker's ``-n`` is ``--served-model-name``.)
- **Several values where SGLang takes one** (``--served-model-name a b``, ``--api-key k1 k2``):
  an error, since keeping the first would silently stop serving the others.
- Both ``--flag value`` and ``--flag=value`` are read, with dashes or underscores, plus the short
  aliases vLLM documents for mapped flags (``-tp``, ``-pp``, ``-dp``, ``-q``, ``-r``).

Errors are :class:`ichat.errors.ConfigError` (so the gateway can check ``managed_workers`` with the
same table); warnings come back in :class:`Translation` for the caller to log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Literal

import attrs

from ichat.errors import ConfigError

#: A parsed canonical value: a boolean flag (``--x`` True, ``--no-x`` False), one value, or several.
Value = bool | str | list[str]
Takes = Literal["flag", "value", "values"]


@attrs.frozen
class Translation:
    argv: list[str]
    warnings: list[str]


@attrs.define
class Context:
    """What a transform may see: every table flag given (vLLM name -> value) and a warning sink."""

    given: dict[str, Value]
    warnings: list[str] = attrs.Factory(list)

    def warn(self, row: Row, message: str) -> None:
        self.warnings.append(f"--{row.vllm}: {message}")


Transform = Callable[["Row", Value, Context], list[str]]


@attrs.frozen
class Row:
    """One canonical flag: its vLLM name, its SGLang name(s) (empty: none), how the value is
    carried over, and a note for the README. ``takes`` says how to read it from a command line."""

    vllm: str
    sglang: tuple[str, ...]
    transform: Transform
    note: str = ""
    takes: Takes = "value"
    aliases: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Transforms. The first line of each docstring is the README's "transform" column.


def same(row: Row, value: Value, ctx: Context) -> list[str]:
    """value copied"""
    values = value if isinstance(value, list) else [value]
    return [f"--{row.sglang[0]}", *values]


def flag(row: Row, value: Value, ctx: Context) -> list[str]:
    """flag; `--no-…` form → nothing (SGLang's default)"""
    return [f"--{name}" for name in row.sglang] if value else []


def inverted(row: Row, value: Value, ctx: Context) -> list[str]:
    """inverted flag: `--no-…` → SGLang flag; `--…` or absent → nothing"""
    return [] if value else [f"--{name}" for name in row.sglang]


def one_value(row: Row, value: Value, ctx: Context) -> list[str]:
    """value copied; SGLang takes one, so several is an error"""
    values = value if isinstance(value, list) else [value]
    if len(values) != 1:
        raise ConfigError(
            f"--{row.vllm} was given {len(values)} values ({' '.join(values)}); "
            f"SGLang's --{row.sglang[0]} takes exactly one",
            param=row.vllm,
        )
    return [f"--{row.sglang[0]}", values[0]]


def token_count(row: Row, value: Value, ctx: Context) -> list[str]:
    """value copied, vLLM's `4k`/`4K` suffixes expanded"""
    return [f"--{row.sglang[0]}", str(human_readable_int(_text(value), row))]


def context_length(row: Row, value: Value, ctx: Context) -> list[str]:
    """value copied, `4k`/`4K` expanded; `auto`/`-1` → nothing, with a warning"""
    if _text(value).strip().lower() in ("-1", "auto"):
        ctx.warn(row, "SGLang cannot fit the context to free memory; it uses the model's own length")
        return []
    return token_count(row, value, ctx)


def batched_tokens(row: Row, value: Value, ctx: Context) -> list[str]:
    """value copied; to `--max-prefill-tokens` instead when chunked prefill is off"""
    name = "max-prefill-tokens" if ctx.given.get("enable-chunked-prefill") is False else row.sglang[0]
    return [f"--{name}", str(human_readable_int(_text(value), row))]


def chunked_prefill(row: Row, value: Value, ctx: Context) -> list[str]:
    """`--no-…` → `--chunked-prefill-size -1`; `--…` → nothing (SGLang's default)"""
    return [] if value else [f"--{row.sglang[0]}", "-1"]


#: vLLM's "fp8" is e4m3 on CUDA; SGLang wants the explicit name.
KV_CACHE_DTYPES = {"fp8": "fp8_e4m3"}


def kv_cache_dtype(row: Row, value: Value, ctx: Context) -> list[str]:
    """value copied; `fp8` → `fp8_e4m3`"""
    text = _text(value)
    return [f"--{row.sglang[0]}", KV_CACHE_DTYPES.get(text, text)]


def lora_modules(row: Row, value: Value, ctx: Context) -> list[str]:
    """`name=path` kept; JSON `{name, path}` → `{lora_name, lora_path}`"""
    values = value if isinstance(value, list) else [value]
    out = []
    for item in values:
        text = item.strip()
        if not text.startswith("{"):
            if "=" not in text:
                raise ConfigError(f"--{row.vllm} expects name=path or JSON, got {item!r}", param=row.vllm)
            out.append(text)
            continue
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--{row.vllm}: {item!r} is not valid JSON ({exc})", param=row.vllm) from exc
        if not isinstance(spec, dict) or "name" not in spec or "path" not in spec:
            raise ConfigError(f"--{row.vllm}: JSON needs 'name' and 'path', got {item!r}", param=row.vllm)
        if "base_model_name" in spec:
            ctx.warn(row, f"base_model_name of {spec['name']!r} is ignored: SGLang adapters apply to the served model")
        out.append(json.dumps({"lora_name": spec["name"], "lora_path": spec["path"]}))
    return [f"--{row.sglang[0]}", *out]


VLLM_MASTER_ADDR = "127.0.0.1"
VLLM_MASTER_PORT = "29501"


def dist_init_addr(row: Row, value: Value, ctx: Context) -> list[str]:
    """joined with its pair as `ADDR:PORT`; vLLM's defaults fill a missing half"""
    if row.vllm == "master-port" and "master-addr" in ctx.given:
        return []  # the master-addr row emits the pair
    addr = _text(ctx.given.get("master-addr", VLLM_MASTER_ADDR))
    port = _text(ctx.given.get("master-port", VLLM_MASTER_PORT))
    host = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr  # IPv6
    return [f"--{row.sglang[0]}", f"{host}:{port}"]


def embedding_runner(row: Row, value: Value, ctx: Context) -> list[str]:
    """`pooling`/`embed` → `--is-embedding`; `auto`/`generate`/`none` → nothing; others refused"""
    value = _text(value)
    if value in ("pooling", "embed"):
        return [f"--{row.sglang[0]}"]
    if value in ("auto", "generate", "none"):
        return []
    raise ConfigError(
        f"--{row.vllm} {value} has no SGLang equivalent (SGLang serves generate or embed)", param=row.vllm
    )


def ignored(row: Row, value: Value, ctx: Context) -> list[str]:
    """dropped, with a warning"""
    ctx.warn(row, f"ignored for SGLang: {row.note}")
    return []


def refused(row: Row, value: Value, ctx: Context) -> list[str]:
    """error"""
    raise ConfigError(f"--{row.vllm} has no SGLang equivalent: {row.note}", param=row.vllm)


def _text(value: Value) -> str:
    """The value of a one-value row (the reader guarantees a str for ``takes="value"``)."""
    if not isinstance(value, str):
        raise TypeError(f"expected one value, got {value!r}")
    return value


def human_readable_int(value: str, row: Row) -> int:
    """vLLM's ``human_readable_int``: ``25.6k`` = 25600, ``1K`` = 1024 (decimal k/m/g/t, binary K/M/G/T)."""
    text = value.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", text)
    if match is None:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--{row.vllm} expects a whole number, got {value!r}", param=row.vllm) from None
    number, suffix = match.groups()
    if suffix.islower():
        return int(float(number) * 10 ** (3 * "kmgt".index(suffix) + 3))
    if "." in number:
        raise ConfigError(f"--{row.vllm}: no decimals with binary suffix {suffix} ({value!r})", param=row.vllm)
    return int(number) * 2 ** (10 * "KMGT".index(suffix) + 10)


# ---------------------------------------------------------------------------------------------
# The table. Order is the order of the translated command line and of the README table.

IN_PROCESS = "the iChat worker serves HTTP; SGLang's engine runs in-process without a server"
KV_SIZE = "SGLang sizes its KV cache by --mem-fraction-static or --max-total-tokens"
GENERATION_DEFAULTS = "pass sampling defaults per request, or SGLang's --preferred-sampling-params"
MULTI_NODE_DP = "vLLM multi-node data parallel; for SGLang use --nnodes, --node-rank, --master-addr"

# fmt: off
TABLE: tuple[Row, ...] = (
    # model and tokenizer
    Row("model", ("model-path",), same, "local directory or hub id"),
    Row("tokenizer", ("tokenizer-path",), same),
    Row("served-model-name", ("served-model-name",), one_value,
        "the worker reads this flag itself and hands it over; SGLang serves one name",
        takes="values",
    ),
    Row("revision", ("revision",), same),
    Row("tokenizer-revision", (), refused, "SGLang loads the tokenizer at --revision"),
    Row("code-revision", (), refused, "SGLang loads remote code at --revision"),
    Row("download-dir", ("download-dir",), same),
    Row("load-format", ("load-format",), same, "SGLang's parser checks the choice"),
    Row("tokenizer-mode", ("tokenizer-mode",), same, "SGLang knows auto and slow only"),
    Row("skip-tokenizer-init", ("skip-tokenizer-init",), flag, takes="flag"),
    Row("trust-remote-code", ("trust-remote-code",), flag, takes="flag"),
    Row("dtype", ("dtype",), same),
    Row("quantization", ("quantization",), same, "SGLang's parser checks the method", aliases=("-q",)),
    Row("kv-cache-dtype", ("kv-cache-dtype",), kv_cache_dtype),
    Row("hf-overrides", ("json-model-override-args",), same, "the same JSON object"),
    Row("chat-template", ("chat-template",), same,
        "a file path or SGLang template name; vLLM's inline Jinja strings are not read by SGLang",
    ),
    Row("runner", ("is-embedding",), embedding_runner),
    Row("convert", ("is-embedding",), embedding_runner),
    # memory, batching, scheduling
    Row("gpu-memory-utilization", ("mem-fraction-static",), same,
        "both a fraction of GPU memory; SGLang's counts weights + KV cache only, so it ends up using a bit more",
        aliases=("--device-memory-utilization",),
    ),
    Row("max-model-len", ("context-length",), context_length),
    Row("max-num-seqs", ("max-running-requests",), same),
    Row("max-num-batched-tokens", ("chunked-prefill-size",), batched_tokens,
        "vLLM's per-step token budget bounds the prefill chunk",
    ),
    Row("enable-chunked-prefill", ("chunked-prefill-size",), chunked_prefill, takes="flag"),
    Row("enable-prefix-caching", ("disable-radix-cache",), inverted,
        "absent: nothing, both engines cache prefixes by default",
        takes="flag",
    ),
    Row("scheduling-policy", ("schedule-policy",), same, "fcfs and priority exist in both"),
    Row("seed", ("random-seed",), same, "absent: vLLM seeds 0, SGLang picks a random seed"),
    Row("cpu-offload-gb", ("cpu-offload-gb",), same),
    Row("stream-interval", ("stream-interval",), same),
    Row("enforce-eager", ("disable-decode-cuda-graph", "disable-prefill-cuda-graph"), flag,
        "no CUDA graphs in either phase",
        takes="flag",
    ),
    Row("disable-custom-all-reduce", ("disable-custom-all-reduce",), flag, takes="flag"),
    # parallelism and distribution
    Row("tensor-parallel-size", ("tp-size",), same, aliases=("-tp",)),
    Row("pipeline-parallel-size", ("pp-size",), same, aliases=("-pp",)),
    Row("data-parallel-size", ("dp-size",), same, aliases=("-dp",)),
    Row("nnodes", ("nnodes",), same, "multi-node TP/PP"),
    Row("node-rank", ("node-rank",), same, aliases=("-r",)),
    Row("master-addr", ("dist-init-addr",), dist_init_addr),
    Row("master-port", ("dist-init-addr",), dist_init_addr),
    # LoRA
    Row("enable-lora", ("enable-lora",), flag, takes="flag"),
    Row("lora-modules", ("lora-paths",), lora_modules, takes="values"),
    Row("max-loras", ("max-loras-per-batch",), same),
    Row("max-cpu-loras", ("max-loaded-loras",), same),
    Row("max-lora-rank", ("max-lora-rank",), same),
    Row("lora-target-modules", ("lora-target-modules",), same, takes="values"),
    # serving (the worker serves HTTP itself; these reach SGLang's serving layer)
    Row("api-key", ("api-key",), one_value,
        "checked by SGLang's HTTP server only, like vLLM's by vLLM's: not by the worker",
        takes="values",
    ),
    Row("tool-call-parser", ("tool-call-parser",), same, "SGLang's parser names"),
    Row("reasoning-parser", ("reasoning-parser",), same, "SGLang's parser names"),
    Row("enable-log-requests", ("log-requests",), flag, takes="flag"),
    # vLLM-only: dropped with a warning (speed, memory or vLLM's own server; never the answers)
    Row("host", (), ignored, IN_PROCESS),
    Row("port", (), ignored, IN_PROCESS),
    Row("block-size", (), ignored, "vLLM's KV block size; SGLang's --page-size is a different knob"),
    Row("swap-space", (), ignored, "vLLM's CPU swap space (vLLM before V1)"),
    Row("num-gpu-blocks-override", (), ignored, f"vLLM's KV block count; {KV_SIZE}"),
    Row("kv-cache-memory-bytes", (), ignored, f"vLLM's KV budget in bytes; {KV_SIZE}"),
    Row("max-parallel-loading-workers", (), ignored, "vLLM's weight-loading parallelism"),
    Row("distributed-executor-backend", (), ignored, "SGLang starts its own processes"),
    Row("async-scheduling", (), ignored, "SGLang overlaps scheduling by default (--disable-overlap-schedule)",
        takes="flag"),
    Row("prefix-caching-hash-algo", (), ignored, "vLLM's block hash"),
    Row("compilation-config", (), ignored, "vLLM's torch.compile/CUDA-graph config; see SGLang's --cuda-graph-* flags",
        aliases=("-cc",)),
    Row("disable-log-stats", (), ignored, "vLLM's periodic stats log", takes="flag"),
    Row("enable-auto-tool-choice", (), ignored, "SGLang calls tools whenever --tool-call-parser is set", takes="flag"),
    Row("max-logprobs", (), ignored, "SGLang has no cap on requested logprobs"),
    Row("uvicorn-log-level", (), ignored, "vLLM's HTTP server"),
    Row("disable-uvicorn-access-log", (), ignored, "vLLM's HTTP server", takes="flag"),
    # vLLM-only: refused (dropping them would change what is served or answered)
    Row("speculative-config", (), refused, "use SGLang's --speculative-algorithm, --speculative-draft-model-path, ...",
        aliases=("-sc",)),
    Row("generation-config", (), refused, GENERATION_DEFAULTS),
    Row("override-generation-config", (), refused, GENERATION_DEFAULTS),
    Row("limit-mm-per-prompt", (), refused, "SGLang has no per-prompt media limit"),
    Row("enable-expert-parallel", (), refused, "use SGLang's --ep-size", takes="flag"),
    Row("headless", (), refused, MULTI_NODE_DP, takes="flag"),
    Row("data-parallel-address", (), refused, MULTI_NODE_DP),
    Row("data-parallel-rpc-port", (), refused, MULTI_NODE_DP),
    Row("data-parallel-size-local", (), refused, MULTI_NODE_DP),
    Row("data-parallel-start-rank", (), refused, MULTI_NODE_DP),
)
# fmt: on


def _index(table: Sequence[Row]) -> dict[str, tuple[Row, bool]]:
    """Every spelling of a table flag -> (row, value for a boolean spelling)."""
    index: dict[str, tuple[Row, bool]] = {}
    for row in table:
        index[f"--{row.vllm}"] = (row, True)
        for alias in row.aliases:
            index[alias] = (row, True)
        if row.takes == "flag":
            index[f"--no-{row.vllm}"] = (row, False)
    return index


_INDEX = _index(TABLE)


def _normalize(token: str) -> tuple[str, str | None]:
    """``--tensor_parallel_size=2`` -> (``--tensor-parallel-size``, ``2``); other tokens as they are."""
    if not token.startswith("--"):
        return token, None
    name, eq, inline = token.partition("=")
    return "--" + name[2:].replace("_", "-"), (inline if eq else None)


def flag_given(argv: Sequence[str], flag: str) -> bool:
    """Whether ``flag`` (dashed, ``--renderer-num-workers``) is among ``argv`` in any spelling vLLM's
    parser takes: dashes or underscores, its value after a space or an ``=``."""
    return any(_normalize(token)[0] == flag for token in argv)


def _is_flag(token: str) -> bool:
    """A token that starts a new flag rather than being a value (``-1`` and ``-0.5`` are values)."""
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False


def to_sglang(argv: Sequence[str], table: Sequence[Row] = TABLE) -> Translation:
    """Translate canonical (vLLM-named) flags to SGLang flags; ConfigError when that cannot be done."""
    index = _INDEX if table is TABLE else _index(table)
    given: dict[str, Value] = {}
    passthrough: list[tuple[str, list[str]]] = []  # (normalised flag, tokens) in command-line order
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        name, inline = _normalize(tokens[i])
        i += 1
        if not _is_flag(name):
            raise ConfigError(
                f"unexpected argument {name!r}: engine flags are --name value (give the model as --model)"
            )
        values = [inline] if inline is not None else []
        while inline is None and i < len(tokens) and not _is_flag(tokens[i]):
            values.append(tokens[i])
            i += 1
        entry = index.get(name)
        if entry is None:
            rebuilt = [f"{name}={inline}"] if inline is not None else [name, *values]
            passthrough.append((name, rebuilt))
            continue
        row, positive = entry
        given[row.vllm] = _read_value(row, name, positive, values, inline is not None)

    ctx = Context(given=given)
    out: list[str] = []
    emitted: dict[str, str] = {}  # SGLang flag -> the vLLM flag it came from
    for row in table:
        if row.vllm in given:
            out += row.transform(row, given[row.vllm], ctx)
            emitted.update({f"--{name}": row.vllm for name in row.sglang})
    for name, rebuilt in passthrough:
        if name in emitted:
            raise ConfigError(
                f"both --{emitted[name]} and {name} were given: they are the same SGLang setting, keep one",
                param=emitted[name],
            )
        out += rebuilt
    return Translation(argv=out, warnings=ctx.warnings)


def _read_value(row: Row, spelled: str, positive: bool, values: list[str], inline: bool) -> Value:
    if row.takes == "flag":
        if values:
            how = f"{spelled}={values[0]}" if inline else f"{spelled} {' '.join(values)}"
            raise ConfigError(
                f"{spelled} takes no value (got {how!r}); use --{row.vllm} or --no-{row.vllm}", param=row.vllm
            )
        return positive
    if not values:
        raise ConfigError(f"{spelled} expects a value", param=row.vllm)
    if row.takes == "value":
        if len(values) > 1:
            raise ConfigError(f"{spelled} expects one value, got {' '.join(values)!r}", param=row.vllm)
        return values[0]
    return values


def describe(transform: Transform) -> str:
    """The README's "transform" column: the first line of the transform's docstring."""
    return (transform.__doc__ or transform.__name__).strip().splitlines()[0]


def markdown_table(table: Sequence[Row] = TABLE) -> str:
    """TABLE as the README shows it."""
    lines = ["| vLLM flag (canonical) | SGLang flag | transform | note |", "|---|---|---|---|"]
    for row in table:
        vllm = " ".join(f"`{s}`" for s in (f"--{row.vllm}", *row.aliases))
        if row.takes == "flag":
            vllm += f" / `--no-{row.vllm}`"
        sglang = " ".join(f"`--{name}`" for name in row.sglang) or "—"
        note = row.note.replace("|", "\\|")
        lines.append(f"| {vllm} | {sglang} | {describe(row.transform)} | {note} |")
    return "\n".join(lines)
