"""The quantization recipes: one YAML per method in the top-level ``quantize/`` folder, validated here.

A recipe is what a user tweaks, so it is plain data with comments, not code: the default scheme and
the schemes ``--scheme`` may pick, the calibration defaults, and the llm-compressor modifiers with
their arguments, written the way llm-compressor's own recipes write them. omniserve adds only what
must follow the model rather than the method: ``targets`` (``Linear`` unless the recipe says
otherwise), the ``scheme`` and the ``ignore`` list (towers, projectors, ``lm_head``; see ``layout.py``).

Loading validates everything a run needs before a model is loaded (a bad recipe costs a second,
not a calibration run), by building the real modifier objects once. Naming a cache entry needs only the
recipe's defaults and hash, read by ``read_recipe_defaults`` with yaml and pydantic alone: an environment
without llm-compressor (vLLM's, in the CUDA image) must name the entries that another one quantized.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from omniserve.config import QUANT_METHODS
from omniserve.quantize.errors import InvalidQuantizeOption, RecipeError

#: ``--method`` values, each with its recipe file ``quantize/<method>.yaml`` (declared with the options).
METHODS: tuple[str, ...] = QUANT_METHODS

#: Modifiers that quantize (they take ``targets``, ``scheme`` and ``ignore``); exactly one per recipe.
_QUANTIZING = {"GPTQModifier", "QuantizationModifier"}
#: Modifiers that only transform weights before quantization (AWQ's smoothing); they get ``ignore`` too.
_TRANSFORMS = {"AWQModifier"}
#: Set by omniserve from the model and the flags; a recipe that sets them would be silently overridden.
_MANAGED_ARGS = {"scheme", "ignore", "config_groups"}


def recipes_dir() -> Path:
    """The top-level ``quantize/`` folder (recipes and the default calibration set).

    From a source checkout (editable install) it is the repository's folder; a wheel installs the
    same files as ``<prefix>/share/omniserve/quantize`` (pyproject's data-files).
    """
    checkout = Path(__file__).resolve().parents[2] / "quantize"
    if (checkout / "gptq.yaml").is_file():
        return checkout
    return Path(sys.prefix) / "share" / "omniserve" / "quantize"


class CalibrationDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_samples: int = Field(128, gt=0, description="Default --num-samples: calibration samples used.")
    max_length: int = Field(2048, gt=0, description="Default --max-length: tokens per calibration sample.")


class RecipeDefaults(BaseModel):
    """What a recipe decides besides its modifiers (method, schemes, calibration defaults) and its hash.

    Read by the cache to name an entry, so it ignores the modifiers instead of checking them: checking
    them needs llm-compressor, which the serving environment may not have. The content hash covers the
    modifiers anyway, so two recipes that differ only there still name different entries.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    method: str
    scheme: str = Field(description="Default scheme (a compressed-tensors preset name).")
    schemes: dict[str, str] = Field(description="Schemes --scheme accepts, with a one-line description each.")
    calibration: CalibrationDefaults = Field(default_factory=CalibrationDefaults)
    source: Path
    sha256: str

    def resolve_scheme(self, scheme: str | None) -> str:
        """The scheme to use: ``scheme`` if given and allowed by this recipe, else the recipe's default."""
        chosen = scheme or self.scheme
        if chosen not in self.schemes:
            raise InvalidQuantizeOption(
                f"unknown scheme {chosen!r} for method {self.method!r}; choose one of {', '.join(self.schemes)} "
                f"(from {self.source})"
            )
        return chosen


class Recipe(RecipeDefaults):
    """One method's recipe, as read from its YAML file (plus where it came from and its content hash)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    summary: str
    ignore: list[str] = Field(
        default_factory=list,
        description="Extra module names/regexes kept in full precision (on top of towers and lm_head).",
    )
    modifiers: list[dict[str, dict[str, Any]]] = Field(min_length=1)

    @field_validator("modifiers")
    @classmethod
    def _one_key_each(cls, value: list[dict[str, dict[str, Any]]]) -> list[dict[str, dict[str, Any]]]:
        for entry in value:
            if len(entry) != 1:
                raise ValueError(f"each modifier is one 'Name: {{args}}' mapping, got keys {sorted(entry)}")
            (name, args), *_ = entry.items()
            if name not in _QUANTIZING | _TRANSFORMS:
                raise ValueError(f"unknown modifier {name!r}; use one of {sorted(_QUANTIZING | _TRANSFORMS)}")
            if not isinstance(args, dict):
                raise ValueError(f"{name}: arguments must be a mapping (use {{}} for none)")
            managed = _MANAGED_ARGS & set(args)
            if managed:
                raise ValueError(
                    f"{name}: {sorted(managed)} are set by omniserve (scheme: top-level 'scheme'/--scheme; "
                    "extra modules to keep: top-level 'ignore')"
                )
        quantizing = [name for entry in value for name in entry if name in _QUANTIZING]
        if len(quantizing) != 1:
            raise ValueError(f"a recipe needs exactly one of {sorted(_QUANTIZING)}, found {quantizing or 'none'}")
        return value

    def build_modifiers(self, *, scheme: str, ignore: list[str]) -> list[Any]:
        """The llm-compressor modifier objects for one run, in recipe order."""
        modifiers = []
        for entry in self.modifiers:
            (name, args), *_ = entry.items()
            kwargs = dict(args)
            if name in _QUANTIZING:
                kwargs.setdefault("targets", ["Linear"])
                kwargs["scheme"] = scheme
                kwargs["ignore"] = [*ignore, *self.ignore]
            modifiers.append(modifier_class(name)(**kwargs))
        return modifiers

    def needs_calibration(self, scheme: str) -> bool:
        """Whether this recipe reads calibration data (GPTQ, AWQ, static activation scales) or is data-free."""
        return any(
            getattr(m, "requires_calibration_data", True) for m in self.build_modifiers(scheme=scheme, ignore=[])
        )


def modifier_class(name: str) -> type:
    """The llm-compressor modifier class a recipe entry names, imported only when asked (llm-compressor is slow)."""
    from omniserve.logs import quiet_llmcompressor

    quiet_llmcompressor()  # often the first llm-compressor import of a run, which logs to stdout
    if name == "GPTQModifier":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier
    if name == "QuantizationModifier":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return AWQModifier


def load_recipe(method: str, path: Path | None = None) -> Recipe:
    """Read and validate ``path`` (default: ``quantize/<method>.yaml``); its ``method`` must be ``method``."""
    recipe = _read(method, path, Recipe)
    _check_modifiers(recipe)
    return recipe


def read_recipe_defaults(method: str, path: Path | None = None) -> RecipeDefaults:
    """``load_recipe`` without llm-compressor: the defaults and hash that name a cache entry, modifiers unchecked."""
    return _read(method, path, RecipeDefaults)


_Read = TypeVar("_Read", bound=RecipeDefaults)


def _read(method: str, path: Path | None, kind: type[_Read]) -> _Read:
    """Parse ``path`` (default: ``quantize/<method>.yaml``) as ``kind``; one code path for both readers."""
    if method not in METHODS:
        raise InvalidQuantizeOption(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    path = Path(path) if path is not None else recipes_dir() / f"{method}.yaml"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must be a YAML mapping (see quantize/README.md)")
    try:
        recipe = kind(**data, source=path, sha256=hashlib.sha256(raw).hexdigest())
    except (ValidationError, TypeError) as exc:
        raise RecipeError(f"{path} is not a valid recipe: {exc}") from exc
    if recipe.method != method:
        raise RecipeError(f"{path} is a recipe for method {recipe.method!r}, not {method!r}")
    if recipe.scheme not in recipe.schemes:
        raise RecipeError(f"{path}: default scheme {recipe.scheme!r} is not listed under 'schemes'")
    return recipe


def _check_modifiers(recipe: Recipe) -> None:
    """Build every modifier once per allowed scheme: bad arguments or scheme names fail here, not mid-run."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    for scheme in recipe.schemes:
        if scheme not in PRESET_SCHEMES:
            raise RecipeError(
                f"{recipe.source}: scheme {scheme!r} is not a compressed-tensors preset "
                f"(known: {', '.join(sorted(PRESET_SCHEMES))})"
            )
        try:
            recipe.build_modifiers(scheme=scheme, ignore=[])
        except (ValidationError, TypeError, ValueError) as exc:
            raise RecipeError(f"{recipe.source}: the modifiers do not accept scheme {scheme!r}: {exc}") from exc
