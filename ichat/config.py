"""The gateway's configuration: typed attrs classes, loaded from YAML.

``load_config(path)`` reads the file with ruamel.yaml's safe loader and structures it with
cattrs (``forbid_extra_keys=True``). Every mistake becomes one :class:`~ichat.errors.ConfigError`
naming the file, the key path (``routing.timeouts.connect_s``, ``routes[1].api_base``) and what
was expected. Types are strict: ``"5"`` is not an integer and ``"no"`` is not a boolean.

``managed_workers`` entries have a handful of iChat keys; every other key is an engine flag in
vLLM's snake_case naming (``tensor_parallel_size: 2``), kept in ``engine_flags`` and turned back
into ``--tensor-parallel-size 2`` by :meth:`ManagedWorkerSpec.to_worker_argv`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory, mapping_structure_factory
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ForbiddenExtraKeysError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from ichat.errors import ConfigError
from ichat.protocol import MANAGED_PREFIX
from ichat.routing.policy import available_policies

log = logging.getLogger(__name__)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class _Invalid(ValueError):
    """A validation failure; ``field`` (when set) is appended to the key path of the report."""

    def __init__(self, expected: str, field: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.field = field


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


# -- validators (attrs) ------------------------------------------------------------------------


def _check(predicate: Callable[[Any], bool], expected: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    def validator(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not predicate(value):
            raise _Invalid(f"expected {expected}, got {_describe(value)}", attribute.name)

    return validator


_non_negative = _check(lambda v: v >= 0, "a number >= 0")
_positive = _check(lambda v: v > 0, "a number > 0")
_port = _check(lambda v: 0 <= v <= 65535, "a TCP port (0-65535)")
_non_empty = _check(lambda v: bool(v and v.strip()), "a non-empty string")


def _policy_name(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, str):
        pairs = [(attribute.name, value)]
    else:
        pairs = [(f"{attribute.name}.{model}", name) for model, name in value.items()]
    known = available_policies()
    for field, name in pairs:
        if name not in known:
            listed = ", ".join(known) or "(none)"
            raise _Invalid(f"unknown routing policy {name!r}; registered policies: {listed}", field)


def _api_base(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        raise _Invalid(f"expected an http(s) URL like http://10.0.0.5:8000/v1, got {value!r}", attribute.name)


def _ray_address(_inst: Any, attribute: attrs.Attribute, value: str | None) -> None:
    # What `ray start --head` prints for other nodes: HOST:PORT (or "auto": the local cluster).
    if value is not None and value != "auto" and not re.fullmatch(r"(ray://)?[A-Za-z0-9.\-]+:\d{1,5}", value):
        raise _Invalid(f"expected a Ray cluster address like 10.0.0.1:6379, got {value!r}", attribute.name)


def _keys(_inst: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    for key in value:
        if not key or key != key.strip() or any(c.isspace() for c in key):
            raise _Invalid("expected API keys without whitespace, and not empty", attribute.name)


# -- sections ----------------------------------------------------------------------------------


@attrs.frozen
class ServerSettings:
    #: address the gateway listens on
    host: str = "0.0.0.0"
    #: TCP port the gateway listens on
    port: int = attrs.field(default=4000, validator=_port)
    #: one of critical, error, warning, info, debug
    log_level: str = attrs.field(
        default="info",
        converter=str.lower,
        validator=_check(lambda v: v in LOG_LEVELS, f"one of {', '.join(LOG_LEVELS)}"),
    )


@attrs.frozen
class RouteSpec:
    """A static OpenAI-compatible upstream; entries sharing ``model_name`` form one pool."""

    model_name: str = attrs.field(validator=_non_empty)
    #: the base URL you would give the OpenAI SDK (``.../v1``); the gateway appends the path after /v1
    api_base: str = attrs.field(converter=lambda s: s.rstrip("/"), validator=_api_base)
    #: sent upstream as ``Authorization: Bearer <api_key>`` in place of the client's key
    api_key: str | None = None
    weight: float = attrs.field(default=1.0, validator=_positive)


@attrs.frozen
class Timeouts:
    #: seconds to open a TCP connection to an upstream (connect errors are retried elsewhere)
    connect_s: float = attrs.field(default=5.0, validator=_positive)
    #: seconds to wait for the upstream's response headers, and at most between two chunks
    first_byte_s: float = attrs.field(default=600.0, validator=_positive)
    #: seconds for the whole request, stream included; 0 means no limit
    total_s: float = attrs.field(default=3600.0, validator=_non_negative)


@attrs.frozen
class CircuitBreakerSettings:
    #: consecutive failures that eject an endpoint
    failures: int = attrs.field(default=3, validator=_check(lambda v: v >= 1, "an integer >= 1"))
    #: seconds an ejected endpoint sits out before one probe request is let through
    cooldown_s: float = attrs.field(default=10.0, validator=_non_negative)


_fraction = _check(lambda v: 0 <= v <= 1, "a number from 0 to 1")
_at_least_one = _check(lambda v: v >= 1, "a number >= 1")


@attrs.frozen
class LeastInflightSettings:
    """How the policies count load (least_inflight, and cache_aware's and session_affinity's
    least-loaded choices; see ichat.routing.least_inflight). Hot-reloadable."""

    #: a request dispatched less than prefill_window_s ago counts 1 + this much (0 = plain count)
    prefill_weight: float = attrs.field(default=4.0, validator=_non_negative)
    #: about the engines' time to first token: how long a new request counts as in prefill
    prefill_window_s: float = attrs.field(default=0.2, validator=_positive)


@attrs.frozen
class CacheAwareSettings:
    """The ``cache_aware`` policy (see ichat.routing.cache_aware). Every key is hot-reloadable."""

    #: prompt block size in characters (token-id prompts: a quarter as many ids)
    block_chars: int = attrs.field(default=256, validator=_check(lambda v: v >= 16, "an integer >= 16"))
    #: blocks hashed per request at most: the prompt beyond block_chars x this is not compared
    max_prompt_blocks: int = attrs.field(default=256, validator=_at_least_one)
    #: index entries (blocks) kept per endpoint, least recently used evicted first
    max_blocks_per_endpoint: int = attrs.field(default=16384, validator=_at_least_one)
    #: an entry not used for this long no longer counts (engines evict too)
    ttl_s: float = attrs.field(default=600.0, validator=_positive)
    #: matched share of the prompt from which affinity applies; below it, the least loaded
    match_threshold: float = attrs.field(default=0.3, validator=_fraction)
    #: the imbalance gate: affinity is overridden (least loaded instead) when the matched
    #: endpoint's load exceeds the least loaded one's by more than balance_abs requests AND
    #: by more than balance_rel times. 32: on an H100 (issue 17's GPU runs), 2 overrode 3-4 % of
    #: matches at concurrency 32, and each override copied a 2,048-token prefix into the other
    #: engine's full cache: hit rate 0.63 against 0.70 at 8 and 0.85 at 32. With new prefixes
    #: placed by spread_new_prefixes, 32 no longer skews a long-prefix workload (180/180).
    balance_abs: float = attrs.field(default=32.0, validator=_non_negative)
    balance_rel: float = attrs.field(default=1.5, validator=_at_least_one)
    #: a prompt with no match (a new prefix) goes to the endpoint with the smallest index among
    #: those the gate would accept (within balance_abs / balance_rel of the least loaded), not
    #: to the least loaded: new prefixes then spread by cache content, as sglang-router's
    #: smallest tree does, but never onto an overloaded endpoint. Off, load-based placement put
    #: 8 of 12 long prefixes on one replica with the gate at 32 (240/120 requests, TTFT p50 2x)
    spread_new_prefixes: bool = True
    #: precise mode: trust what the engines report they hold (workers started with
    #: --report-prefix-cache) over what was sent to them; workers that do not report fall back
    #: to the approximate index
    precise: bool = False
    #: precise mode: a prefix sent to an endpoint this recently counts as held there before its
    #: report says so (a report follows the engine's prefill, up to a report interval later)
    precise_grace_s: float = attrs.field(default=3.0, validator=_non_negative)


@attrs.frozen
class SessionAffinitySettings:
    """The ``session_affinity`` policy (see ichat.routing.session)."""

    #: request header carrying the session key ("" = none)
    header: str = "X-Session-Id"
    #: top-level body field used as the session key when the header is absent ("" = none)
    body_field: str = "user"
    #: bounded load: an endpoint takes a session only while its load is at most this factor
    #: times the pool's average (plus one); otherwise the session's next endpoint
    load_factor: float = attrs.field(default=1.25, validator=_at_least_one)


@attrs.frozen
class MigrationSettings:
    """Streams that outlive their worker (see ichat.gateway.migration). Opt-in per model."""

    #: models whose broken chat/completion streams continue on another replica
    models: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: replicas a stream may move to, at most, after the first one
    max_attempts: int = attrs.field(default=2, validator=_check(lambda v: v >= 1, "an integer >= 1"))


@attrs.frozen
class RoutingSettings:
    #: default policy name (entry points group ``ichat.routing``)
    policy: str = attrs.field(default="cache_aware", validator=_policy_name)
    #: model name -> policy name, overriding ``policy``
    per_model: dict[str, str] = attrs.field(factory=dict, validator=_policy_name)
    timeouts: Timeouts = attrs.Factory(Timeouts)
    #: largest accepted request body, in MB (2**20 bytes)
    max_body_mb: float = attrs.field(default=32.0, validator=_positive)
    #: extra attempts on other endpoints of the pool, before any byte reached the client
    retries: int = attrs.field(default=2, validator=_check(lambda v: v >= 0, "an integer >= 0"))
    circuit_breaker: CircuitBreakerSettings = attrs.Factory(CircuitBreakerSettings)
    least_inflight: LeastInflightSettings = attrs.Factory(LeastInflightSettings)
    cache_aware: CacheAwareSettings = attrs.Factory(CacheAwareSettings)
    session_affinity: SessionAffinitySettings = attrs.Factory(SessionAffinitySettings)
    migration: MigrationSettings = attrs.Factory(MigrationSettings)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@attrs.frozen
class AuthSettings:
    """Credentials of the three route classes (see ichat.gateway.auth and README "Security").

    Keys as written, plus the ``*_env`` names they may also come from. After
    :meth:`GatewayConfig.from_dict` the plain fields hold the resolved values (file keys and
    environment keys together); the ``*_env`` names are kept for display. A class with no
    credential is served to loopback peers only.
    """

    #: client keys for the data plane (/v1/* except admin, logs and workers)
    api_keys: tuple[str, ...] = attrs.field(default=(), validator=_keys)
    #: environment variable holding comma-separated client keys
    api_keys_env: str | None = None
    #: token workers on other hosts present on /v1/workers/* (heartbeat, deregister)
    worker_token: str | None = None
    worker_token_env: str | None = None
    #: after a reload changes worker_token, the previous token is still accepted this long,
    #: so that workers started with it can be restarted with the new one (0: at once)
    worker_token_grace_s: float = attrs.field(default=600.0, validator=_non_negative)
    #: key for /v1/admin/*, /v1/logs/* and /ui
    admin_key: str | None = None
    admin_key_env: str | None = None
    #: explicit opt-in: client keys are admin keys too (the old fallback; off by default)
    allow_client_keys_for_admin: bool = False

    @property
    def enabled(self) -> bool:
        """Client keys are configured (the data plane checks them)."""
        return bool(self.api_keys)

    def admin_keys(self) -> tuple[str, ...]:
        keys = (self.admin_key,) if self.admin_key else ()
        if self.allow_client_keys_for_admin:
            keys += tuple(k for k in self.api_keys if k not in keys)
        return keys


@attrs.frozen
class LimitsSettings:
    """Bounds that keep hostile or broken peers from exhausting the gateway (README "Security")."""

    #: client connections open at once; beyond it a new connection gets 503 and is closed
    max_connections: int = attrs.field(default=4096, validator=_check(lambda v: v >= 1, "an integer >= 1"))
    #: seconds a client has to send a request's headers (also an idle keep-alive connection's life)
    header_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    #: registered workers at most; a heartbeat of a new worker beyond it gets 503
    max_workers: int = attrs.field(default=1024, validator=_check(lambda v: v >= 1, "an integer >= 1"))
    #: workers that left whose logs stay readable; the oldest are forgotten beyond it
    dead_worker_logs: int = attrs.field(default=32, validator=_check(lambda v: v >= 0, "an integer >= 0"))


@attrs.frozen
class LogsSettings:
    #: lines of worker logs kept per worker in memory
    ring_lines: int = attrs.field(default=10000, validator=_check(lambda v: v >= 0, "an integer >= 0"))


@attrs.frozen
class RegistrySettings:
    """How the gateway decides a registered worker is alive (see ichat.gateway.registry)."""

    #: a worker is unhealthy after this many of its own heartbeat intervals without a beat
    missed_heartbeats: int = attrs.field(default=3, validator=_check(lambda v: v >= 1, "an integer >= 1"))
    #: ... and forgotten (removed from the registry) after this long without a beat
    evict_after_s: float = attrs.field(default=120.0, validator=_check(lambda v: v > 0, "a number > 0"))
    #: the gateway's own /health probe of every worker, catching a hung worker that still beats
    probe_interval_s: float = attrs.field(default=2.0, validator=_check(lambda v: v > 0, "a number > 0"))
    probe_timeout_s: float = attrs.field(default=2.0, validator=_check(lambda v: v > 0, "a number > 0"))
    #: consecutive failed probes that take a worker out of rotation
    probe_failures: int = attrs.field(default=2, validator=_check(lambda v: v >= 1, "an integer >= 1"))


@attrs.frozen
class SupervisorSettings:
    """How managed workers are stopped and restarted (see ichat.gateway.supervisor)."""

    #: SIGTERM, then this long to drain, then SIGKILL of the process group
    stop_timeout_s: float = attrs.field(default=30.0, validator=_check(lambda v: v > 0, "a number > 0"))
    #: restart backoff: initial * 2**(crashes-1), capped
    backoff_initial_s: float = attrs.field(default=1.0, validator=_check(lambda v: v > 0, "a number > 0"))
    backoff_max_s: float = attrs.field(default=60.0, validator=_check(lambda v: v > 0, "a number > 0"))
    #: this many crashes within the window stop the restarts (a crash loop), until reload/launch
    crash_loop_max: int = attrs.field(default=5, validator=_check(lambda v: v >= 1, "an integer >= 1"))
    crash_loop_window_s: float = attrs.field(default=600.0, validator=_check(lambda v: v > 0, "a number > 0"))
    #: a ready managed worker unhealthy for this long is killed and restarted (hung, not dead)
    hung_restart_s: float = attrs.field(default=60.0, validator=_check(lambda v: v > 0, "a number > 0"))
    #: a managed worker not ready after this long is killed and restarted (load can be slow)
    start_timeout_s: float = attrs.field(default=900.0, validator=_check(lambda v: v > 0, "a number > 0"))


# -- managed workers ---------------------------------------------------------------------------

_FLAG_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_Scalar = (str, int, float, bool)


def _flag_values(_inst: Any, attribute: attrs.Attribute, value: dict[str, Any]) -> None:
    # Engine flags sit at the top of a managed_workers entry; backend_args are nested.
    where = "" if attribute.name == "engine_flags" else f"{attribute.name}."
    for name, flag in value.items():
        if not isinstance(name, str) or not _FLAG_NAME.match(name):
            raise _Invalid(f"flags use vLLM's snake_case names (e.g. tensor_parallel_size), got {name!r}", f"{where}{name}")
        if isinstance(flag, (list, tuple)):
            if not all(isinstance(item, _Scalar) for item in flag):
                raise _Invalid(f"expected a list of scalars, got {_describe(list(flag))}", f"{where}{name}")
        elif not isinstance(flag, _Scalar):
            expected = "a string, number, boolean or list of those"
            raise _Invalid(f"expected {expected}, got {_describe(flag)}", f"{where}{name}")


def _kebab(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_argv(name: str, value: Any) -> list[str]:
    """True -> bare flag, False -> nothing, list -> one flag then each value."""
    if value is True:
        return [_kebab(name)]
    if value is False:
        return []
    if isinstance(value, (list, tuple)):
        return [_kebab(name), *map(str, value)] if value else []
    return [_kebab(name), str(value)]


@attrs.frozen
class ManagedWorkerSpec:
    """A worker process the gateway starts itself (``python -m ichat.worker ...``)."""

    model_name: str = attrs.field(validator=_non_empty)
    model_path: str = attrs.field(validator=_non_empty)
    port: int = attrs.field(validator=_port)
    backend: str = "vllm"
    #: GPUs handed to the worker through CUDA_VISIBLE_DEVICES
    gpu_ids: tuple[int, ...] = ()
    #: the Ray cluster a multi-host worker joins (with distributed_executor_backend: ray), handed
    #: to the worker as RAY_ADDRESS; the gateway starts no Ray process itself
    ray_address: str | None = attrs.field(default=None, validator=_ray_address)
    host: str = "127.0.0.1"
    heartbeat_interval: float = attrs.field(default=3.0, validator=_positive)
    log_streaming: bool = True
    #: backend-specific flags (names as the worker accepts them, snake_case)
    backend_args: dict[str, Any] = attrs.field(factory=dict, validator=_flag_values)
    #: passed verbatim at the end of the worker's command line
    extra_args: tuple[str, ...] = ()
    #: every other key of the entry: engine flags in vLLM snake_case naming
    engine_flags: dict[str, Any] = attrs.field(factory=dict, validator=_flag_values)

    @property
    def worker_id(self) -> str:
        """Stable across restarts of the gateway and of the worker: one entry, one id."""
        return MANAGED_PREFIX + re.sub(r"[^A-Za-z0-9_.-]+", "-", self.model_name) + f"-{self.port}"

    def to_worker_argv(self) -> list[str]:
        argv = [
            "--model", os.path.expanduser(self.model_path),
            "--served-model-name", self.model_name,
            "--backend", self.backend,
            "--host", self.host,
            "--port", str(self.port),
            "--heartbeat-interval", str(self.heartbeat_interval),
        ]  # fmt: skip
        if not self.log_streaming:
            argv.append("--no-log-streaming")
        for flags in (self.engine_flags, self.backend_args):
            for name, value in flags.items():
                argv += _flag_argv(name, value)
        argv += self.extra_args
        return argv


_WORKER_KEYS = frozenset(f.name for f in attrs.fields(ManagedWorkerSpec))
# Flags the worker command line already carries; as engine flags they would appear twice.
_WORKER_OWNED_FLAGS = frozenset({"model", "served_model_name", "gateway_address", "log_streaming", "no_log_streaming"})


# -- the whole file ----------------------------------------------------------------------------


@attrs.frozen
class GatewayConfig:
    server_settings: ServerSettings = attrs.Factory(ServerSettings)
    routes: tuple[RouteSpec, ...] = ()
    routing: RoutingSettings = attrs.Factory(RoutingSettings)
    auth: AuthSettings = attrs.Factory(AuthSettings)
    managed_workers: tuple[ManagedWorkerSpec, ...] = ()
    #: where the gateway persists state (workers launched through the admin API)
    state_dir: str | None = None
    logs: LogsSettings = attrs.Factory(LogsSettings)
    registry: RegistrySettings = attrs.Factory(RegistrySettings)
    supervisor: SupervisorSettings = attrs.Factory(SupervisorSettings)
    limits: LimitsSettings = attrs.Factory(LimitsSettings)
    #: where this config came from, for messages; not a key of the file
    source: str = attrs.field(default="<dict>", kw_only=True)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any] | None, source: str = "<dict>", environ: Mapping[str, str] | None = None
    ) -> GatewayConfig:
        """Structure and validate ``data``; raises ConfigError naming ``source`` and the key path."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {_describe(data)}")
        # An empty section (``routes:`` with everything below commented out) means "defaults".
        data = {k: v for k, v in data.items() if v is not None}
        if data.pop("litellm_settings", None) is not None:
            log.warning("iChat does not use LiteLLM; litellm_settings ignored (%s)", source)
        config = _structure(data, cls, source, "")
        auth = _resolve_env(config.auth, os.environ if environ is None else environ, source)
        return attrs.evolve(config, auth=auth, source=source)


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> GatewayConfig:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}") from exc
    try:
        data = YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from exc
    environ = os.environ if environ is None else environ
    return GatewayConfig.from_dict(expand_env(data, environ, source), source=source, environ=environ)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(data: Any, environ: Mapping[str, str], source: str = "<dict>", path: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in string values (so one config file works on
    every machine, e.g. ``model_path: ${ICHAT_MODELS_DIR}/smollm2-135m-instruct``)."""
    if isinstance(data, str):

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = environ.get(name)
            if value is None:
                if default is None:
                    raise ConfigError(f"{source}: {path or '<top>'}: environment variable {name} is not set")
                return default
            return value

        return _ENV_REF.sub(replace, data)
    if isinstance(data, Mapping):
        return {k: expand_env(v, environ, source, _join(path, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, environ, source, _join(path, i)) for i, v in enumerate(data)]
    return data


def structure_managed_worker(data: Any, where: str = "managed_workers") -> ManagedWorkerSpec:
    """Validate one managed-worker entry (for the admin API); errors name ``where``."""
    return _structure(data, ManagedWorkerSpec, where, "")


# -- structuring -------------------------------------------------------------------------------


def _strict(kind: type | tuple[type, ...], expected: str, convert: Callable[[Any], Any] = lambda v: v):
    def structure(value: Any, _type: Any) -> Any:
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise _Invalid(f"expected {expected}, got {_describe(value)}")
        if not isinstance(value, kind):
            raise _Invalid(f"expected {expected}, got {_describe(value)}")
        return convert(value)

    return structure


def _checked_container(factory: Callable[..., Any], accepted: tuple[type, ...], expected: str):
    def make(type_: Any, converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
        inner = factory(type_, converter)

        def structure(value: Any, t: Any) -> Any:
            if not isinstance(value, accepted):
                raise _Invalid(f"expected {expected}, got {_describe(value)}")
            return inner(value, t)

        return structure

    return make


def _mapping_only(make_inner: Callable[[Any, cattrs.Converter], Callable[[Any, Any], Any]]):
    def make(cl: Any, converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
        inner = make_inner(cl, converter)

        def structure(value: Any, t: Any) -> Any:
            if not isinstance(value, Mapping):
                raise _Invalid(f"expected a mapping, got {_describe(value)}")
            return inner(value, t)

        return structure

    return make


def _make_worker_hook(cl: Any, converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    known = make_dict_structure_fn(cl, converter)

    def structure(value: Mapping[str, Any], t: Any) -> ManagedWorkerSpec:
        fields = {k: v for k, v in value.items() if k in _WORKER_KEYS}
        flags = {k: v for k, v in value.items() if k not in _WORKER_KEYS}
        explicit = fields.pop("engine_flags", None) or {}
        if not isinstance(explicit, Mapping):
            raise _Invalid(f"expected a mapping, got {_describe(explicit)}", "engine_flags")
        flags = {**explicit, **flags}
        for name in flags:
            if name in _WORKER_OWNED_FLAGS:
                raise _Invalid("set by iChat itself; use model_name / model_path / log_streaming instead", name)
        spec = known(fields, t)
        return attrs.evolve(spec, engine_flags={k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()})

    return structure


def _make_section_hook(cl: Any, converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    # GatewayConfig.source is set by from_dict, never read from the file.
    overrides = {"source": cattrs.gen.override(omit=True)} if cl is GatewayConfig else {}
    return make_dict_structure_fn(cl, converter, **overrides)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(float, _strict((int, float), "a number", float))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))
    conv.register_structure_hook(Any, lambda v, _t: v)
    conv.register_structure_hook_factory(
        lambda t: get_origin(t) is tuple and len(get_args(t)) == 2 and get_args(t)[1] is Ellipsis,
        _checked_container(homogenous_tuple_structure_factory, (list, tuple), "a list"),
    )
    conv.register_structure_hook_factory(
        lambda t: get_origin(t) is dict, _checked_container(mapping_structure_factory, (dict,), "a mapping")
    )
    conv.register_structure_hook_factory(lambda t: t is ManagedWorkerSpec, _mapping_only(_make_worker_hook))
    conv.register_structure_hook_factory(
        lambda t: attrs.has(t) and t is not ManagedWorkerSpec, _mapping_only(_make_section_hook)
    )
    return conv


_converter = _make_converter()


def _structure(data: Any, cl: type, source: str, path: str) -> Any:
    try:
        return _converter.structure(data, cl)
    except (BaseValidationError, ValueError, TypeError, KeyError) as exc:
        problems = list(_problems(exc, path))
        raise ConfigError(f"{source}: " + "; ".join(f"{p or '(top level)'}: {m}" for p, m in problems)) from exc


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else part


def _problems(exc: BaseException, path: str):
    """Walk cattrs' exception groups, yielding (key path, what was expected)."""
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, AttributeValidationNote):
            path = _join(path, note.name)
        elif isinstance(note, IterableValidationNote):
            path = _join(path, note.index)
    if isinstance(exc, BaseValidationError):
        for sub in exc.exceptions:
            yield from _problems(sub, path)
    elif isinstance(exc, ForbiddenExtraKeysError):
        expected = ", ".join(f.name for f in attrs.fields(exc.cl) if f.name != "source")
        for key in sorted(map(str, exc.extra_fields)):
            yield _join(path, key), f"unknown key (expected one of: {expected})"
    elif isinstance(exc, _Invalid):
        yield (_join(path, exc.field) if exc.field else path), exc.expected
    elif isinstance(exc, KeyError):
        # cattrs reads a required field that is absent; its note already named the key
        yield path, "required key is missing"
    else:
        yield path, f"invalid value ({exc})"


def _resolve_env(auth: AuthSettings, environ: Mapping[str, str], source: str) -> AuthSettings:
    """Fold ``*_env`` variables into the plain fields; a named but unset variable is an error,
    so that a typo cannot silently turn authentication off."""

    def read(env_name: str, key: str) -> str:
        value = environ.get(env_name, "").strip()
        if not value:
            raise ConfigError(f"{source}: auth.{key}: environment variable {env_name} is not set or empty")
        return value

    changes: dict[str, Any] = {}
    if auth.api_keys_env:
        env_keys = tuple(k.strip() for k in read(auth.api_keys_env, "api_keys_env").split(",") if k.strip())
        changes["api_keys"] = tuple(dict.fromkeys(auth.api_keys + env_keys))
    for name in ("worker_token", "admin_key"):
        env_name = getattr(auth, f"{name}_env")
        if env_name and not getattr(auth, name):
            changes[name] = read(env_name, f"{name}_env")
    return attrs.evolve(auth, **changes) if changes else auth
