"""Run inside .venv-sglang-args, with one SGLang version's folder first on PYTHONPATH (SGLang's real
parser; see scripts/setup_sglang_parser_venv.sh).

Reads a JSON list of cases ``{"argv": [...], "served_model_name": [...] | null}`` on stdin, runs each
through the plugin's real parse path (``SGLangEngineFactory.parse_args``: the translation table,
then SGLang's ``ServerArgs.add_cli_args`` / ``from_cli_args``) and prints one JSON object:
``{"version", "options": [every SGLang option string], "api": {name: "module.attr" | null},
"results": [...]}``, a result being ``{"ok": true, "argv", "warnings", "fields": {ServerArgs field:
value}}`` or ``{"ok": false, "exit_code", "stderr"}`` when the parser refused. ``api`` says where
each of the plugin's ``API_LOCATIONS`` was found in this SGLang's source (read, not imported: the
engine's modules need CUDA packages this venv does not have).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import logging
import sys
import types
from pathlib import Path
from typing import Any


class _Anything(type):
    """Any attribute of the stand-in below, at any depth, and calling it, give this class back."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return cls

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls


class _Placeholder(metaclass=_Anything):
    pass


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """SGLang 0.5.16 imports ``torchvision.io.decode_jpeg`` at module level (and transformers then
    imports more of torchvision). No torchvision build matches the CPU torch of this venv (PyPI's
    is CUDA-only and fails at import), and parsing flags never decodes an image: a stand-in whose
    every name is a placeholder lets the parser import. Installed only when torchvision is absent."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.28.0"  # the release made for torch 2.13, this venv's (transformers compares it)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _resolve_a_missing_accelerator_as_cpu() -> None:
    """SGLang 0.5.16 resolves the device while it parses (``ServerArgs.__post_init__`` calls
    ``get_device()``, which raises on a machine without an accelerator); 0.5.23 leaves it for the
    engine. On this CPU-only machine the probe answers "cpu" where SGLang would raise, so 0.5.16's
    post-init validation runs, on its CPU path. An explicit ``--device`` is never touched."""
    import sglang.srt.server_args as server_args_module

    real = getattr(server_args_module, "get_device", None)
    if real is None:
        return

    def get_device(device_id: Any = None) -> str:
        try:
            return real(device_id)
        except RuntimeError:
            return "cpu"

    server_args_module.get_device = get_device


def _fields(server_args: Any) -> dict[str, Any]:
    """ServerArgs as a dict: a dataclass in SGLang 0.5.16, a msgspec Struct in 0.5.23."""
    if dataclasses.is_dataclass(server_args):
        return {f.name: getattr(server_args, f.name) for f in dataclasses.fields(server_args)}
    import msgspec

    return msgspec.structs.asdict(server_args)


def _defines(path: Path, attr: str) -> bool:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == attr:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in node.targets):
            return True
    return False


def _api_sources(locations: dict[str, list[tuple[str, str]]]) -> dict[str, str | None]:
    root = Path(importlib.util.find_spec("sglang").origin).parent.parent  # type: ignore[union-attr]
    found: dict[str, str | None] = {}
    for name, candidates in locations.items():
        found[name] = None
        for module, attr in candidates:
            base = root.joinpath(*module.split("."))
            path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            if path.exists() and _defines(path, attr):
                found[name] = f"{module}.{attr}"
                break
    return found


def main() -> None:
    if importlib.util.find_spec("torchvision") is None:
        sys.meta_path.insert(0, _TorchvisionStandIn())
    import sglang.version

    from ichat.engines import sglang as plugin

    logging.disable(logging.CRITICAL)  # the translation's warnings come back in the result
    factory = plugin.SGLangEngineFactory()
    parser, _ = factory.build_parser()
    _resolve_a_missing_accelerator_as_cpu()
    options = sorted(s for action in parser._actions for s in action.option_strings)
    results = []
    for case in json.load(sys.stdin):
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                spec = factory.parse_args(case["argv"], served_model_name=case.get("served_model_name"))
        except SystemExit as exc:
            results.append({"ok": False, "exit_code": exc.code, "stderr": stderr.getvalue()})
            continue
        args = spec.engine_args
        results.append(
            {
                "ok": True,
                "argv": list(args.argv),
                "warnings": list(args.warnings),
                "served_model_names": list(spec.served_model_names),
                "fields": _fields(args.server_args),
            }
        )
    json.dump(
        {
            "version": sglang.version.__version__,
            "options": options,
            "api": _api_sources(plugin.API_LOCATIONS),
            "results": results,
        },
        sys.stdout,
        default=repr,
    )


if __name__ == "__main__":
    main()
