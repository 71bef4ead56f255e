"""Evaluation suites: small YAML files under the top-level ``eval/`` folder, validated before anything runs.

A suite names its data (a folder beside the YAML, or a generator run at evaluation time), the
EvalScope format the data is in, how answers are scored and how the model is asked. Validation
happens here, at load time, so a typo costs milliseconds instead of a server start.

Formats map to EvalScope's custom-data benchmarks:

- ``mcq``: text multiple choice (``general_mcq``, ``{subset}_val.jsonl`` with question, A..J, answer)
- ``vmcq``: vision multiple choice (``general_vmcq``, MMMU-style ``<image 1>`` placeholders, ``image_1``)
- ``qa``: text question answering (``general_qa``, ``{subset}_test.jsonl`` with question, answer)
- ``vqa``: OpenAI-style messages with image/video/audio parts (``general_vqa``, ``{subset}_test.jsonl``)

One format is scored by omniserve itself, not EvalScope (EvalScope sends no ``tools`` or
``response_format`` with custom data):

- ``tools``: OpenAI-style messages sent with the item's ``tools`` (``tool_choice`` auto) or its
  ``response_format``; scored ``tool-call`` (``eval/tools_suite.py``: function name, arguments, and
  schema validity of calls; schema validity and value of JSON answers).
- ``asr``: each item's audio uploaded to ``/v1/audio/transcriptions`` (the server adds its own instruction);
  scored ``wer`` (``eval/asr_suite.py``: word error rate with jiwer; the score is 1 - WER, at least 0).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from omniserve.eval.errors import InvalidSuite, UnknownSuite
from omniserve.validation import describe_validation_error

Format = Literal["mcq", "vmcq", "qa", "vqa", "tools", "asr"]
#: ``accuracy``: the chosen letter (multiple choice); ``exact``: the whole reply equals the answer after
#: EvalScope's normalisation (case, punctuation, articles); ``rouge``: EvalScope's Rouge (primary Rouge-L recall).
#: ``tool-call``: every check of ``synth.evaluate.score_reply`` holds (format ``tools`` only).
#: ``wer``: 1 - the corpus word error rate, at least 0, so higher is better like every score (format ``asr`` only).
Scoring = Literal["accuracy", "exact", "rouge", "tool-call", "wer"]
#: Split EvalScope reads for each format (the file is ``{subset}_{split}.jsonl``).
SPLITS: dict[str, str] = {"mcq": "val", "vmcq": "val", "qa": "test", "vqa": "test", "tools": "test", "asr": "test"}
#: Formats omniserve sends and scores itself, each with the one scoring that fits it.
OWN_SCORING: dict[str, str] = {"tools": "tool-call", "asr": "wer"}
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class Generation(BaseModel):
    """Sampling for every question: greedy and short by default, so scores are reproducible."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(16, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=2.0)


class Generated(BaseModel):
    """Data written at evaluation time by a deterministic generator instead of files in the repository."""

    model_config = ConfigDict(extra="forbid")

    generator: Literal["omni-synth"]
    seed: int = 0
    per_task: int = Field(20, ge=1, le=10000, description="Test examples written per task (subset).")


class Suite(BaseModel):
    """One suite file. ``path`` is where it was read from; relative data folders resolve beside it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    format: Format
    scoring: Scoring
    subsets: list[str] = Field(min_length=1)
    data: str | None = Field(None, description="Folder with the JSONL files, relative to the suite file.")
    generate: Generated | None = None
    metrics: list[Literal["Rouge", "BLEU"]] | None = Field(
        None, description="Only with scoring: rouge. BLEU needs NLTK data EvalScope downloads; default Rouge only."
    )
    limit: int | None = Field(None, ge=1, description="Default items per subset (--limit overrides).")
    generation: Generation = Generation()
    path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> Suite:
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must be lower-case letters, digits, '.', '_' or '-'")
        if (self.data is None) == (self.generate is None):
            raise ValueError("give exactly one of 'data' (a folder) or 'generate' (a generator)")
        multiple_choice = self.format in ("mcq", "vmcq")
        if multiple_choice != (self.scoring == "accuracy"):
            raise ValueError(f"format {self.format!r} cannot be scored with {self.scoring!r}")
        if self.metrics is not None and self.scoring != "rouge":
            raise ValueError("'metrics' only applies to scoring: rouge")
        if self.metrics is not None and "Rouge" not in self.metrics:
            raise ValueError("'metrics' must include Rouge: it is the primary metric of scoring: rouge")
        if any((self.format == fmt) != (self.scoring == scoring) for fmt, scoring in OWN_SCORING.items()):
            raise ValueError(f"format {self.format!r} cannot be scored with {self.scoring!r}")
        if self.generate is not None and self.format not in ("vqa", "tools", "asr"):
            raise ValueError("generated data is written as OpenAI messages: use format: vqa (or tools, asr)")
        for subset in self.subsets:
            if not _NAME.match(subset):
                raise ValueError(f"subset {subset!r} must be lower-case letters, digits, '.', '_' or '-'")
        return self

    @property
    def split(self) -> str:
        return SPLITS[self.format]

    def data_dir(self) -> Path | None:
        """The committed data folder, or None for generated data."""
        if self.data is None:
            return None
        base = self.path.parent if self.path is not None else Path.cwd()
        return (base / self.data).resolve()


def suites_dir() -> Path:
    """The built-in suites: ``<checkout>/eval`` from a source tree, else ``<prefix>/share/omniserve/eval``."""
    checkout = Path(__file__).resolve().parents[2] / "eval"
    if (checkout / "omni-synth.yaml").is_file():
        return checkout
    return Path(sys.prefix) / "share" / "omniserve" / "eval"


def builtin_suites() -> list[str]:
    """Names of the suites shipped in ``eval/`` (one ``NAME.yaml`` each)."""
    folder = suites_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_suite(ref: str | Path) -> Suite:
    """A suite from a built-in name or a YAML file path; ``UnknownSuite`` / ``InvalidSuite`` otherwise."""
    text = str(ref)
    path = Path(text).expanduser()
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        path = suites_dir() / f"{text}.yaml"
        if not path.is_file():
            known = ", ".join(builtin_suites()) or "none found"
            raise UnknownSuite(f"unknown suite {text!r}: built-in suites are {known}; or pass a suite YAML file")
    if not path.is_file():
        raise UnknownSuite(f"suite file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InvalidSuite(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidSuite(f"{path} must hold a mapping (name, description, format, ...), not {type(raw).__name__}")
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        # every problem, not only the deepest: a suite file is fixed in one pass, not one error per run
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise InvalidSuite(f"{path} does not describe a valid suite: {problems}") from None
    return suite.model_copy(update={"path": path.resolve()})


def _describe(error: Mapping[str, Any]) -> str:
    """One pydantic error as ``field: problem``; ``suite: problem`` for a rule about the whole file."""
    problem = describe_validation_error([error])
    return problem.message if problem.location else f"suite: {problem.message}"
