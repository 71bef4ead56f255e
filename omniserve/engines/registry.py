"""Engine lookup by name: built-ins imported lazily, third-party engines through an entry point.

A package adds an engine by declaring, in its pyproject::

    [project.entry-points."omniserve.engines"]
    myengine = "my_package.engine:MyEngine"

where ``MyEngine`` subclasses ``omniserve.engines.base.Engine`` (constructed as
``MyEngine(config: EngineConfig)``) and fills in its four hooks: ``launch`` (create the native
engine, return its ``ModelInfo``), ``shutdown``, ``prepare`` (sampling parameters in the engine's
terms) and ``stream`` (its outputs as ``ChoiceDelta`` objects). Admission, readiness, stats and
the 400/429/503 refusals come with the base class, the same for every engine.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from omniserve.config import EngineConfig
from omniserve.engines.base import Engine
from omniserve.errors import ModelLoadError

ENTRY_POINT_GROUP = "omniserve.engines"
_BUILTIN = {
    "transformers": "omniserve.engines.transformers_engine:TransformersEngine",
    "vllm": "omniserve.engines.vllm_engine:VllmEngine",
    "sglang": "omniserve.engines.sglang_engine:SGLangEngine",
    "lmdeploy": "omniserve.engines.lmdeploy_engine:LMDeployEngine",
}


def available_engines() -> list[str]:
    return sorted({*_BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def _load(target: str) -> type[Engine]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def create_engine(name: str, config: EngineConfig) -> Engine:
    if name in _BUILTIN:
        cls = _load(_BUILTIN[name])
    else:
        matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not matches:
            raise ModelLoadError(f"unknown engine {name!r}; available: {', '.join(available_engines())}")
        cls = matches[0].load()
    return cls(config)
