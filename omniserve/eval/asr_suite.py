"""Run an ``asr`` suite (``asr-synth``): audio uploaded to ``/v1/audio/transcriptions``, scored by word error rate.

EvalScope's custom-data benchmarks send chat messages only, so each item goes through the official
``openai`` client here, as a transcription client sends it: ``client.audio.transcriptions.create``
with the item's audio file and nothing else (no ``language`` or ``prompt``), so the server asks the
model with its own instruction, the one the ``spoken`` training task was written with.

Transcripts are compared with the references by jiwer after the same normalisation on both sides
(lower case, punctuation removed, runs of spaces collapsed). The word error rate is the corpus's:
all substitutions, deletions and insertions over all reference words, so a long utterance weighs
more than a short one. WER falls as quality rises and can exceed 1 (a reply full of extra words);
like every score in a report, the suite's score rises with quality: ``1 - WER``, at least 0 (metric
``1-wer``). Each subset reports that score, ``SUBSET.wer`` the WER itself (lower is better) and
``SUBSET.exact`` the share of items transcribed exactly. A request that fails (an HTTP error, a
timeout) is an errored item, not a wrong one, and makes the suite ``incomplete``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniserve.eval.datasets import StagedSuite
from omniserve.eval.errors import DatasetMissing, MissingExtra
from omniserve.eval.progress import SuiteProgress
from omniserve.eval.report import SubsetScore, SuiteResult
from omniserve.eval.scored_suite import Scored, ask_and_score
from omniserve.eval.target import Target

METRIC = "1-wer"


@dataclass
class WerScore:
    """Edits against reference words over a set of items, and how many items were transcribed exactly."""

    errors: int = 0  # substitutions + deletions + insertions
    words: int = 0  # reference words
    exact: int = 0
    total: int = 0
    wrong: list[tuple[str, str, str]] = field(default_factory=list)  # (id, reference, transcript)

    @property
    def wer(self) -> float | None:
        return self.errors / self.words if self.words else None

    @property
    def score(self) -> float | None:
        """``1 - WER``, at least 0: higher is better, like every suite score."""
        wer = self.wer
        return None if wer is None else max(0.0, 1.0 - wer)

    @property
    def exact_rate(self) -> float | None:
        return self.exact / self.total if self.total else None

    def add(self, ident: str, reference: str, transcript: str) -> None:
        """Count one item (edits by jiwer on the normalised words)."""
        edits, words = word_edits(reference, transcript)
        self.errors += edits
        self.words += words
        self.total += 1
        if edits == 0:
            self.exact += 1
        else:
            self.wrong.append((ident, reference, transcript))

    def merge(self, other: WerScore) -> WerScore:
        return WerScore(
            self.errors + other.errors, self.words + other.words, self.exact + other.exact, self.total + other.total
        )


def _jiwer() -> Any:
    try:
        import jiwer
    except ImportError:
        raise MissingExtra(
            "jiwer is not installed here (asr suites score with it): pip install 'omniserve[eval]'"
        ) from None
    return jiwer


def normalise(text: str) -> str:
    """What is compared: lower case, no punctuation, single spaces (the spoken task's transcripts are already so)."""
    jiwer = _jiwer()
    steps = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip()])
    return steps(text)


def word_edits(reference: str, transcript: str) -> tuple[int, int]:
    """``(substitutions + deletions + insertions, reference words)`` of one transcript, after ``normalise``."""
    ref = normalise(reference)
    if not ref:  # no words to miss: WER is undefined (jiwer refuses an empty reference)
        raise DatasetMissing(f"an asr item's reference transcript has no words: {reference!r}")
    out = _jiwer().process_words(ref, normalise(transcript))
    return out.substitutions + out.deletions + out.insertions, out.hits + out.substitutions + out.deletions


def run_asr_suite(
    staged: StagedSuite, target: Target, *, concurrency: int, request_timeout: float, progress: SuiteProgress
) -> SuiteResult:
    """Upload every staged item's audio, score the transcripts, return the suite's result (never raises on a reply)."""
    scores: dict[str, WerScore] = {subset: WerScore() for subset in staged.totals}

    def transcribe(client: Any, record: dict[str, Any]) -> str:
        audio = audio_file(record)
        return client.audio.transcriptions.create(
            model=target.model,
            file=(audio.name, audio.read_bytes()),
            response_format="json",
            temperature=staged.suite.generation.temperature,
        ).text

    def tally(subset: str, record: dict[str, Any], transcript: str) -> None:
        scores[subset].add(record.get("id", "?"), record["answer"], transcript)

    return ask_and_score(
        staged,
        target,
        metric=METRIC,
        records=_records,
        request=transcribe,
        tally=tally,
        running_score=lambda: _overall(scores).score,
        summary=lambda: _summary(scores),
        concurrency=concurrency,
        request_timeout=request_timeout,
        progress=progress,
    )


def audio_file(record: dict[str, Any]) -> Path:
    """The item's audio: the path of its one ``input_audio`` part (made absolute and checked when staged)."""
    for message in record.get("messages", []):
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            if part.get("type") == "input_audio":
                return Path(part["input_audio"]["data"])
    raise DatasetMissing(f"asr item {record.get('id', '?')} has no input_audio part")


def _records(staged: StagedSuite, subset: str) -> list[dict[str, Any]]:
    file = staged.local_path / f"{subset}_{staged.suite.split}.jsonl"
    records = [json.loads(line) for line in file.read_text("utf-8").splitlines() if line.strip()]
    for record in records:
        audio_file(record)  # every item names its audio: a broken file fails before the first request
    return records


def _overall(scores: dict[str, WerScore]) -> WerScore:
    total = WerScore()
    for score in scores.values():
        total = total.merge(score)
    return total


def _summary(scores: dict[str, WerScore]) -> Scored:
    """The score (1 - WER), and per subset the same, ``.wer`` and ``.exact``; wrong transcripts for wrong.txt."""
    subsets: dict[str, SubsetScore] = {}
    for name, score in scores.items():
        subsets[name] = SubsetScore(score=score.score, samples=score.total)
        subsets[f"{name}.wer"] = SubsetScore(score=score.wer, samples=score.total)
        subsets[f"{name}.exact"] = SubsetScore(score=score.exact_rate, samples=score.total)
    overall = _overall(scores)
    wrong = [f"{ident}: expected {ref!r}, got {hyp!r}" for s in scores.values() for ident, ref, hyp in s.wrong]
    return Scored(score=overall.score, subsets=subsets, scored=overall.total, wrong=wrong)
