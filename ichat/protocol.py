"""The wire protocol between workers and the gateway: one heartbeat, one state vocabulary.

Both sides use :class:`Heartbeat`: the worker builds one and sends ``unstructure(beat)``; the
gateway reads the body with :func:`parse_heartbeat`, which validates every field and names the
one that is wrong (``InvalidRequest.param``). Unknown fields are ignored, so a newer worker can
add optional fields without breaking an older gateway; the whole body is bounded
(``MAX_HEARTBEAT_BYTES``), and so is every field. To add a field: an attribute with a default
and a validator below, then set it in ``ichat.worker.heartbeat.build_heartbeat``.

Worker states, and the layer that owns each:

    state          owner                      meaning
    loading        worker (reported)          HTTP is up, the engine is loading
    ready          worker (reported)          the engine serves
    draining       worker (reported)          stopping: finishing in-flight requests
    error          worker (reported)          the engine failed
    unhealthy      gateway registry (derived) reported ready, but beats missed or probes failing
    stopped, starting, crashed, backing_off,  gateway supervisor (managed processes only; see
    stopping, failed (and ready/unhealthy)    ichat.gateway.supervisor.TRANSITIONS)

Trust fields: a managed child proves it is the gateway's child with the secret handed to it in
``WORKER_SECRET_ENV`` (sent as its bearer token with ``CHILD_HEADER``), and answers adoption
challenges with :func:`child_proof`. Addresses are plain host names or IP literals, never URLs.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
import struct
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs
from cattrs.errors import AttributeValidationNote, BaseValidationError

from ichat.errors import InvalidRequest

# -- states ------------------------------------------------------------------------------------

LOADING, READY, DRAINING, ERROR = "loading", "ready", "draining", "error"
#: what a worker may report in a heartbeat
REPORTED_STATES = frozenset({LOADING, READY, DRAINING, ERROR})
#: derived by the registry from a "ready" worker whose beats or probes fail
UNHEALTHY = "unhealthy"

# -- trust -------------------------------------------------------------------------------------

#: environment variable through which the supervisor hands a managed child its secret
WORKER_SECRET_ENV = "ICHAT_WORKER_SECRET"
#: header carrying a request's prompt block hashes from the gateway to the worker (precise
#: cache_aware routing): ``<units>;<hash>,<hash>,...``, see prefix_header
PREFIX_BLOCKS_HEADER = "X-Ichat-Prefix-Blocks"
#: header naming the managed child whose secret the bearer token is
CHILD_HEADER = "X-IChat-Worker-Id"
#: query parameter of GET /info carrying an adoption challenge
CHALLENGE_PARAM = "challenge"


def child_proof(secret: str, challenge: str, pid: int, port: int) -> str:
    """Pure: a managed child's answer to an adoption challenge, bound to its pid and port."""
    message = f"adopt\n{challenge}\n{pid}\n{port}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


# -- bounds ------------------------------------------------------------------------------------

MAX_HEARTBEAT_BYTES = 64 * 1024
#: gateway block hashes a worker's prefix-cache report lists at most (a full one fits a beat)
MAX_PREFIX_REPORT_BLOCKS = 2048
#: gateway block hashes one request's X-Ichat-Prefix-Blocks header carries at most
MAX_PREFIX_HEADER_BLOCKS = 128
_INT64 = (-(1 << 63), (1 << 63) - 1)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
#: ids of this prefix are the gateway's static routes: no heartbeat may take one
STATIC_ROUTE_PREFIX = "route:"
#: ids of this prefix are managed workers: a heartbeat needs the child's secret to take one
MANAGED_PREFIX = "managed-"


class _Bad(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def plain_host(host: str) -> bool:
    """Pure: an IPv4/IPv6 literal or a DNS name, nothing else (no scheme, userinfo, port, path,
    brackets or whitespace that could turn ``http://{host}:{port}`` into another URL)."""
    if not host or len(host) > 253:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return all(_HOST_LABEL.match(label) for label in labels) and not host.replace(".", "").isdigit()


def _text(max_len: int, *, pattern: re.Pattern[str] | None = None, empty: bool = False):
    def check(_inst: Any, attribute: attrs.Attribute, value: str | None) -> None:
        if value is None:
            return
        if not value and not empty:
            raise _Bad(attribute.name, f"heartbeat field {attribute.name!r} must not be empty")
        if len(value) > max_len:
            raise _Bad(attribute.name, f"heartbeat field {attribute.name!r} is longer than {max_len} characters")
        if pattern is not None and not pattern.match(value):
            raise _Bad(attribute.name, f"heartbeat field {attribute.name!r} has characters it may not have")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise _Bad(attribute.name, f"heartbeat field {attribute.name!r} has control characters")

    return check


def _host(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if not plain_host(value):
        raise _Bad("host", "heartbeat host must be a plain host name or IP address (no scheme, port, path or user)")


def _port(_inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if not 0 < value < 65536:
        raise _Bad("port", "heartbeat port must be 1..65535")


def _state(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in REPORTED_STATES:
        raise _Bad("state", f"heartbeat state must be one of {sorted(REPORTED_STATES)}")


def _interval(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if not (math.isfinite(value) and 0 < value <= 3600):
        raise _Bad("heartbeat_interval", "heartbeat_interval must be > 0 and <= 3600 seconds")


def _scalar_map(max_keys: int):
    def check(name: str, value: Mapping[str, Any]) -> None:
        if len(value) > max_keys:
            raise _Bad(name, f"heartbeat field {name!r} has more than {max_keys} keys")
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > 64:
                raise _Bad(name, f"heartbeat field {name!r} has a bad key")
            if not (item is None or isinstance(item, (str, int, float, bool))):
                raise _Bad(name, f"heartbeat field {name!r}.{key} must be a number, string, boolean or null")
            if isinstance(item, str) and len(item) > 256:
                raise _Bad(name, f"heartbeat field {name!r}.{key} is too long")

    return check


_load_map = _scalar_map(32)
_gpu_map = _scalar_map(32)


def _load(_inst: Any, attribute: attrs.Attribute, value: Mapping[str, Any]) -> None:
    _load_map("load", value)
    for key in ("running", "waiting", "inflight"):
        item = value.get(key)
        if item is not None and (not isinstance(item, int) or isinstance(item, bool) or item < 0):
            raise _Bad("load", f"heartbeat load.{key} must be an integer >= 0")


def _gpus(_inst: Any, attribute: attrs.Attribute, value: tuple[Mapping[str, Any], ...]) -> None:
    if len(value) > 64:
        raise _Bad("gpus", "heartbeat gpus lists more than 64 GPUs")
    for gpu in value:
        _gpu_map("gpus", gpu)


def _strings(max_items: int, max_len: int):
    def check(_inst: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
        if len(value) > max_items or any(len(v) > max_len for v in value):
            raise _Bad(attribute.name, f"heartbeat field {attribute.name!r} is too long")

    return check


def _positive_int(_inst: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value <= 0:
        raise _Bad(attribute.name, f"heartbeat field {attribute.name!r} must be > 0")


def _prefix_cache(_inst: Any, attribute: attrs.Attribute, value: Mapping[str, Any] | None) -> None:
    """``{"seq": n, "full": bool, "added": [hash, ...], "removed": [hash, ...]}``: the gateway
    block hashes the worker's engine holds (see ichat.worker.prefixcache), bounded."""
    if value is None:
        return
    name = "prefix_cache"
    seq = value.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise _Bad(name, "heartbeat prefix_cache.seq must be an integer >= 0")
    if not isinstance(value.get("full"), bool):
        raise _Bad(name, "heartbeat prefix_cache.full must be true or false")
    total = 0
    for key in ("added", "removed"):
        items = value.get(key, [])
        if not isinstance(items, list):
            raise _Bad(name, f"heartbeat prefix_cache.{key} must be a list")
        total += len(items)
        if total > MAX_PREFIX_REPORT_BLOCKS:
            raise _Bad(name, f"heartbeat prefix_cache lists more than {MAX_PREFIX_REPORT_BLOCKS} blocks")
        low, high = _INT64
        for item in items:
            if not isinstance(item, int) or isinstance(item, bool) or not low <= item <= high:
                raise _Bad(name, f"heartbeat prefix_cache.{key} must hold 64-bit integers")


#: one precompiled little-endian int64 packer per count of hashes (a constant table, built once)
_HASH_PACKERS = tuple(struct.Struct(f"<{n}q") for n in range(MAX_PREFIX_HEADER_BLOCKS + 1))


def prefix_header(units: float, hashes: list[int]) -> bytes:
    """The X-Ichat-Prefix-Blocks value for a prompt of ``units`` blocks with these block hashes:
    ``<units>;x<hex>``, 16 hex digits a hash (int64, little-endian). Packed, not written as
    decimal text: the text of 32 ints was most of precise mode's extra cost (5.6 against 1.9 µs)."""
    sent = hashes[:MAX_PREFIX_HEADER_BLOCKS]
    return b"%.2f;x" % units + _HASH_PACKERS[len(sent)].pack(*sent).hex().encode()


def parse_prefix_header(value: str | None) -> tuple[float, list[int]] | None:
    """Pure: (units, hashes) from an X-Ichat-Prefix-Blocks value; None when absent or malformed
    (a hint, never an error: the request is served the same either way). Also takes the
    decimal form ``<units>;<hash>,<hash>,...`` that gateways before the packed one send."""
    if not value or len(value) > 32 + 21 * MAX_PREFIX_HEADER_BLOCKS:
        return None
    units_text, _, hashes_text = value.partition(";")
    try:
        units = float(units_text)
        if hashes_text.startswith("x"):
            raw = bytes.fromhex(hashes_text[1:])
            count = len(raw) // 8
            if len(raw) * 2 != len(hashes_text) - 1 or len(raw) % 8 or not 0 < count <= MAX_PREFIX_HEADER_BLOCKS:
                return None  # whitespace (fromhex skips it), a partial hash, none or too many
            hashes = list(_HASH_PACKERS[count].unpack(raw))
        else:
            hashes = [int(h) for h in hashes_text.split(",")] if hashes_text else []
    except ValueError:
        return None
    low, high = _INT64
    if not (math.isfinite(units) and 0 < units <= 1e6) or not hashes or len(hashes) > MAX_PREFIX_HEADER_BLOCKS:
        return None
    if any(not low <= h <= high for h in hashes):
        return None
    return units, hashes


@attrs.frozen
class Heartbeat:
    """One beat: who the worker is, where to reach it, what it serves and how busy it is."""

    worker_id: str = attrs.field(validator=_text(128, pattern=_ID))
    instance_id: str = attrs.field(validator=_text(128, pattern=_ID))
    model_name: str = attrs.field(validator=_text(1024))
    host: str = attrs.field(validator=_host)
    port: int = attrs.field(validator=_port)
    state: str = attrs.field(validator=_state)
    heartbeat_interval: float = attrs.field(validator=_interval)
    backend: str = attrs.field(default="unknown", validator=_text(64))
    model_path: str | None = attrs.field(default=None, validator=_text(4096))
    served_model_names: tuple[str, ...] = attrs.field(default=(), validator=_strings(16, 256))
    engine_args: tuple[str, ...] = attrs.field(default=(), validator=_strings(512, 4096))
    version: str | None = attrs.field(default=None, validator=_text(64))
    log_streaming: bool = True
    load: Mapping[str, Any] = attrs.field(factory=dict, validator=_load)
    gpus: tuple[Mapping[str, Any], ...] = attrs.field(default=(), validator=_gpus)
    pid: int | None = attrs.field(default=None, validator=_positive_int)
    inflight: int | None = None
    spec_digest: str | None = attrs.field(default=None, validator=_text(64))
    error: str | None = attrs.field(default=None, validator=_text(4096, empty=True))
    #: what the worker's model serves: its routes, plus input kinds such as "image_input"
    #: (see ichat.engines.base.KINDS); optional, empty when a worker does not report it
    kinds: tuple[str, ...] = attrs.field(
        default=(), converter=lambda v: tuple(sorted(set(v))), validator=_strings(32, 64)
    )
    #: the gateway block hashes its engine's prefix cache holds (``--report-prefix-cache``):
    #: see _prefix_cache; None when the worker does not report
    prefix_cache: Mapping[str, Any] | None = attrs.field(default=None, validator=_prefix_cache)


# -- (un)structuring ---------------------------------------------------------------------------


def _strict(kind: type | tuple[type, ...], expected: str, convert=lambda v: v):
    kinds = kind if isinstance(kind, tuple) else (kind,)

    def structure(value: Any, _type: Any) -> Any:
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise TypeError(f"expected {expected}")
        return convert(value)

    return structure


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False, detailed_validation=True)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(float, _strict((int, float), "a number", float))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))
    exact = {
        Mapping[str, Any]: _strict(dict, "a JSON object"),
        tuple[str, ...]: lambda v, _t: tuple(_strict(str, "a string")(i, str) for i in _list(v)),
        tuple[Mapping[str, Any], ...]: lambda v, _t: tuple(_strict(dict, "a JSON object")(i, dict) for i in _list(v)),
    }
    conv.register_structure_hook_func(lambda t: t in exact, lambda v, t: exact[t](v, t))
    return conv


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError("expected a list")
    return value


_converter = _make_converter()


def _field_of(exc: BaseException) -> str | None:
    if isinstance(exc, _Bad):
        return exc.field
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, AttributeValidationNote):
            return note.name
    if isinstance(exc, BaseValidationError):
        for sub in exc.exceptions:
            found = _field_of(sub)
            if found:
                return found
    return None


def parse_heartbeat(body: Any) -> Heartbeat:
    """Validate a heartbeat body; InvalidRequest names the field that is wrong. Unknown
    fields are ignored; a null optional field means its default."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("heartbeat body must be a JSON object")
    data = {k: v for k, v in body.items() if v is not None and k in _FIELDS}
    for name in _REQUIRED:
        if name not in data:
            raise InvalidRequest(f"heartbeat field {name!r} is required", param=name)
    try:
        return _converter.structure(data, Heartbeat)
    except _Bad as exc:
        raise InvalidRequest(exc.message, param=exc.field) from None
    except (BaseValidationError, TypeError, ValueError) as exc:
        field = _field_of(exc)
        if isinstance(exc, BaseValidationError):
            for sub in exc.exceptions:
                if isinstance(sub, _Bad):
                    raise InvalidRequest(sub.message, param=sub.field) from None
        raise InvalidRequest(f"heartbeat field {field!r} has the wrong type", param=field) from None


def unstructure(beat: Heartbeat) -> dict[str, Any]:
    return _converter.unstructure(beat)


_FIELDS = frozenset(f.name for f in attrs.fields(Heartbeat))
_REQUIRED = tuple(f.name for f in attrs.fields(Heartbeat) if f.default is attrs.NOTHING)
