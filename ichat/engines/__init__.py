"""Engine plugins, found through the ``ichat.engines`` entry-point group.

Adding an engine is a new module plus one entry point; nothing in the worker core changes.

Holds: ``base`` (the plugin contract: EngineFactory, Engine, results), ``vllm``, ``sglang``,
``args`` (vLLM flag names -> SGLang's), ``stub`` (a stand-in engine for control-plane tests).
May import: ``ichat.errors`` only (and the engines' own libraries, lazily); never the worker or
the gateway.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from ichat.engines.base import EngineFactory
from ichat.errors import EngineUnavailable

GROUP = "ichat.engines"


def installed_engines() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_engine_factory(name: str) -> EngineFactory:
    """The factory registered under ``name``; EngineUnavailable names the installed ones otherwise.

    Loading a factory must not import the engine itself (that happens in ``parse_args``), so a
    worker without SGLang still lists it and runs vLLM.
    """
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        raise EngineUnavailable(
            f"unknown backend {name!r}; installed engines: {', '.join(installed_engines()) or 'none'}"
        )
    factory_cls = matches[0].load()
    return factory_cls()
