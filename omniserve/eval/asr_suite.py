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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniserve.eval.datasets import StagedSuite
from omniserve.eval.errors import DatasetMissing, MissingExtra
from omniserve.eval.progress import SuiteProgress
from omniserve.eval.report import SampleCounts, SubsetScore, SuiteResult
from omniserve.eval.target import Target

METRIC = "1-wer"
_ERRORS_SHOWN = 5


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
    import openai

    suite = staged.suite
    started = time.monotonic()
    client = openai.OpenAI(base_url=target.base_url, api_key=target.api_key, max_retries=0, timeout=request_timeout)
    items = [(subset, record) for subset in staged.totals for record in _records(staged, subset)]
    task = progress.add(suite.name, len(items))
    scores: dict[str, WerScore] = {subset: WerScore() for subset in staged.totals}
    failures: list[str] = []
    done = 0

    def one(item: tuple[str, dict[str, Any]]) -> str | Exception:
        audio = audio_file(item[1])
        try:
            result = client.audio.transcriptions.create(
                model=target.model,
                file=(audio.name, audio.read_bytes()),
                response_format="json",
                temperature=suite.generation.temperature,
            )
        except openai.OpenAIError as exc:
            return exc
        return result.text

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for (subset, record), reply in zip(items, pool.map(one, items), strict=True):
            done += 1
            if isinstance(reply, Exception):
                failures.append(f"{record.get('id', '?')}: {type(reply).__name__}: {reply}")
            else:
                scores[subset].add(record.get("id", "?"), record["answer"], reply)
            progress.update(task, done, _overall(scores).score)
    result = _result(staged, scores, failures, time.monotonic() - started)
    progress.finish(task, result.status, result.score)
    return result


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


def _result(staged: StagedSuite, scores: dict[str, WerScore], failures: list[str], seconds: float) -> SuiteResult:
    suite = staged.suite
    subsets: dict[str, SubsetScore] = {}
    for name, score in scores.items():
        subsets[name] = SubsetScore(score=score.score, samples=score.total)
        subsets[f"{name}.wer"] = SubsetScore(score=score.wer, samples=score.total)
        subsets[f"{name}.exact"] = SubsetScore(score=score.exact_rate, samples=score.total)
    overall = _overall(scores)
    errors = []
    if failures:
        errors.append(f"{len(failures)} of {staged.total} items failed: " + "; ".join(failures[:_ERRORS_SHOWN]))
    wrong = [f"{ident}: expected {ref!r}, got {hyp!r}" for s in scores.values() for ident, ref, hyp in s.wrong]
    status = "complete" if not failures else ("incomplete" if overall.total else "error")
    result = SuiteResult(
        suite=suite.name,
        description=suite.description,
        format=suite.format,
        scoring=suite.scoring,
        benchmark=staged.benchmark,
        metric=METRIC,
        status=status,
        score=overall.score,
        subsets=subsets,
        samples=SampleCounts(requested=staged.total, scored=overall.total, errored=len(failures)),
        errors=errors,
        seconds=round(seconds, 2),
    )
    if wrong:  # the report's errors list is for failures; wrong transcripts go beside the run's data
        (staged.local_path / "wrong.txt").write_text("\n".join(wrong) + "\n", "utf-8")
    return result
