"""``omniserve models``: what omniserve will do with a checkpoint folder, before anything is served or trained.

It reads ``config.json`` and the processor, never the weights: the family (``models.families``) and
architecture, the media the processor takes, the engines that load it, how training finds the
assistant tokens in its chat template, and whether (and how) it is already quantized.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from omniserve.errors import ModelLoadError


class ModelsOptions(BaseModel):
    """What ``omniserve models`` describes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Path = Field(description="Checkpoint folder to describe (transformers layout).")
    json_output: bool = Field(
        False, description="Print one JSON object instead of text.", json_schema_extra={"flag": "json"}
    )


@dataclass(frozen=True)
class ModelDescription:
    path: str
    architecture: str
    family: str  # the family's title, or "text-only causal LM"
    modalities: list[str]
    engines: list[str]
    chat_template: str  # "none", or where it comes from
    mask_strategy: str  # how training finds the assistant tokens
    quantization: str  # "none", or the method and format
    gaps: dict[str, str]

    def lines(self) -> list[str]:
        rows = [
            ("path", self.path),
            ("architecture", self.architecture),
            ("family", self.family),
            ("modalities", ", ".join(self.modalities)),
            ("engines", ", ".join(self.engines)),
            ("chat template", self.chat_template),
            ("training masks", self.mask_strategy),
            ("quantization", self.quantization),
        ]
        rows += [(f"not yet ({column})", reason) for column, reason in self.gaps.items()]
        width = max(len(name) for name, _ in rows)
        return [f"{name.ljust(width)}  {value}" for name, value in rows]

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` as a mapping; ``ModelLoadError`` for a folder without one or an unreadable one."""
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is not a checkpoint folder (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from None


def describe(path: Path) -> ModelDescription:
    """Describe the checkpoint at ``path`` (raises ``ModelLoadError``, e.g. for an unsupported architecture)."""
    from omniserve.models.families import architecture_of, family_for

    config = read_config(path)
    family = family_for(config)
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(path)
    modalities = [m for m in ("text", "image", "video", "audio") if m in renderer.modalities]
    return ModelDescription(
        path=str(path),
        architecture=architecture_of(config),
        family=family.title if family is not None else "text-only causal LM (no family module)",
        modalities=modalities,
        engines=_engines(config, list(family.engines) if family is not None else ["transformers", "vllm"]),
        chat_template="present" if renderer.has_chat_template else "none (only /v1/completions can serve it)",
        mask_strategy=_mask_strategy(renderer),
        quantization=_quantization(config),
        gaps=dict(family.gaps) if family is not None else {},
    )


def _engines(config: dict[str, Any], engines: list[str]) -> list[str]:
    """The family's engines, less transformers for a GPTQ/AWQ checkpoint it cannot run here (extra missing)."""
    from omniserve.models.published_quant import published_format, transformers_can_serve

    published = published_format(config)
    if published is not None and not transformers_can_serve(published):
        return [engine for engine in engines if engine != "transformers"]
    return engines


def _mask_strategy(renderer: Any) -> str:
    """The strategy ``auto`` picks, probed on a two-turn text conversation (per-conversation for ``prefix``)."""
    from omniserve.templates.training import LabelError, render_training_examples

    if not renderer.has_chat_template:
        return "none: no chat template to train with"
    probe = [
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "Another one?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
    ]
    try:
        strategy = render_training_examples(renderer, probe, []).strategy
    except (LabelError, ModelLoadError, ValueError) as exc:
        return f"cannot be masked: {exc}"
    return STRATEGIES.get(strategy, strategy)


#: What each strategy ``auto`` can pick means for the user of ``omniserve models``.
STRATEGIES = {
    "markers": "markers: the template's {% generation %} blocks",
    "prefix": "prefix: each assistant turn found by rendering conversation prefixes (no generation markers)",
    "per-turn": "per-turn: the template rewrites earlier turns, so each assistant turn is trained on its own prefix",
    "served-prompt": "served-prompt: the template writes past assistant turns unlike its generation prompt, so each "
    "turn is trained on the exact prompt the server sends for it",
}


def _quantization(config: dict[str, Any]) -> str:
    from omniserve.models.published_quant import engines_line, published_format

    published = published_format(config)  # GPTQ/AWQ: which engines run it here depends on an extra
    if published is not None:
        return engines_line(published)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return "none"
    method = qc.get("quant_method", "unknown")
    detail = qc.get("format") or qc.get("bits")
    return f"{method}" + (f" ({detail})" if detail else "")
