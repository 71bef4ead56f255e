"""Pieces every adapter over an external engine (vLLM, SGLang, LMDeploy) needs, written once.

- ``InProcessEngine``: the lifecycle every adapter shares (the package check at construction, the
  model info once started, readiness, stats, admission of a request into a counted stream, stop).
- ``Admission``: the bounded queue. External engines queue without limit (or answer 503), but the
  ``Engine`` contract is a 429 raised synchronously by ``generate`` once ``max_concurrency`` running
  plus ``max_queue`` waiting sequences are taken, so the adapter counts what it admitted.
- ``AdmittedStream``: gives an admission back exactly once, whether the stream ends, fails or is
  closed, even closed before its first iteration (an async generator closed unstarted never runs
  its ``finally``, which would leak queue places).
- ``ChoiceDecoder``: for engines that stream token ids (SGLang, LMDeploy), the text of one choice
  made by omniserve's own detokenizer, so stop strings, held-back partial characters and
  ``skip_special_tokens`` behave exactly as with the transformers engine.
- ``engine_args_from_cli_parser``: ``--engine-arg KEY=VALUE`` checked and converted by the
  engine's own command-line parser, so omniserve accepts exactly what ``vllm serve`` /
  ``python -m sglang.launch_server`` accept, with their types and choices, and says so before the
  engine starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import importlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, ClassVar

from omniserve.config import EngineConfig
from omniserve.engines.base import ChoiceDelta, Engine, EngineStats, GenerationRequest, ModelInfo, TokenLogprobs
from omniserve.engines.child_output import ChildOutputTail
from omniserve.engines.detokenizer import IncrementalDetokenizer
from omniserve.errors import EngineUnavailable, ModelLoadError, QueueFull

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class InProcessEngine(Engine):
    """An external engine running in the gateway's process; subclasses say how to start, stream and stop it.

    Subclasses set ``NAME`` (as ``--engine`` spells it), ``PACKAGE`` (imported at construction, so a
    missing package fails before anything loads) and ``INSTALL_HINT``; ``start`` ends with
    ``_started``; ``generate`` builds its stream and hands it to ``_admit``.
    """

    NAME: ClassVar[str]
    PACKAGE: ClassVar[str]
    INSTALL_HINT: ClassVar[str]

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        try:
            importlib.import_module(self.PACKAGE)
        except ImportError as exc:
            raise ModelLoadError(
                f"the {self.NAME} engine cannot serve {config.model}: the {self.PACKAGE} package is not installed "
                f"({exc}); {self.INSTALL_HINT}"
            ) from exc
        self._tokenizer: Any = None
        self._info: ModelInfo | None = None
        self._stopping = False
        self._admission = Admission(config.max_concurrency, config.max_queue)

    @property
    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise EngineUnavailable("the engine has not started")
        return self._info

    def is_ready(self) -> bool:
        return self._info is not None and not self._stopping and self._alive()

    def _alive(self) -> bool:
        """Whether the engine itself still runs; override where the engine can tell (vLLM's ``errored``)."""
        return True

    def stats(self) -> EngineStats:
        return EngineStats(waiting=self._admission.waiting, running=self._admission.running)

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        """Stop the engine if one was created (blocking: ``stop`` runs it in a thread)."""
        raise NotImplementedError

    def _started(self, max_model_len: int, eos_token_ids: tuple[int, ...] | None = None) -> None:
        """Record the model info once the engine runs; the gateway fills in the modalities."""
        cfg = self._config
        if eos_token_ids is None:
            eos_token_ids = tuple(t for t in [self._tokenizer.eos_token_id] if t is not None)
        self._info = ModelInfo(
            name=cfg.served_model_name,
            path=str(cfg.model),
            max_model_len=max_model_len,
            modalities=frozenset(),
            eos_token_ids=eos_token_ids,
        )

    @contextlib.contextmanager
    def _starting(self) -> Iterator[None]:
        """Build the engine inside this block; a failure becomes one ``ModelLoadError`` (``_start_failure``).

        The engines build their workers in child processes, whose errors reach the parent only as
        "initialization failed, see above": what they print is kept meanwhile to quote it.
        """
        children = ChildOutputTail()
        try:
            with children:
                yield
        except (Exception, SystemExit) as exc:  # LMDeploy's environment checks call exit(1)
            children.settle()
            raise ModelLoadError(self._start_failure(exc, children.root_cause())) from exc

    def _start_failure(self, exc: BaseException, child_error: str | None) -> str:
        """The message for a failed start; an adapter that recognises its engine's failures overrides it."""
        if isinstance(exc, SystemExit):
            cause = child_error or f"the engine exited with status {exc.code}"
        else:
            cause = f"{type(exc).__name__}: {exc}"
            if child_error and child_error not in cause:
                cause += f" (engine process: {child_error})"
        if "nvidia" in cause.lower() or "cuda" in cause.lower():
            fix = f"{self.NAME} needs a CUDA GPU and its driver; without one, serve with --engine transformers"
        else:
            fix = (
                f"check the engine args (--engine-arg) and that {self.NAME} supports this architecture, "
                "or use --engine transformers"
            )
        return f"the {self.NAME} engine could not start {self._config.model}: {cause}. Fix: {fix}"

    def _check_ready(self) -> None:
        if not self.is_ready():
            raise EngineUnavailable(f"the {self.NAME} engine is not ready to generate")

    def _admit(self, request: GenerationRequest, deltas: AsyncIterator[ChoiceDelta]) -> AdmittedStream:
        """Take the request's places in the bounded queue (429 when full) and give them back with the stream."""
        self._admission.reserve(request.sampling.n)
        return AdmittedStream(deltas, self._admission, request.sampling.n)


class Admission:
    """Counts sequences admitted to an engine: ``waiting`` until their first token, then ``running``."""

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.capacity = max_concurrency + max_queue
        self.max_concurrency = max_concurrency
        self.waiting = 0
        self.running = 0

    def reserve(self, sequences: int) -> None:
        """Take places for ``sequences`` or raise ``QueueFull`` (before any work starts)."""
        if self.waiting + self.running + sequences > self.capacity:
            raise QueueFull(
                f"the server is at capacity ({self.running} sequences running, {self.waiting} waiting); retry later"
            )
        self.waiting += sequences

    def started(self, sequences: int) -> None:
        moved = min(sequences, self.waiting)
        self.waiting -= moved
        self.running += moved

    def release(self, waiting: int, running: int) -> None:
        self.waiting -= waiting
        self.running -= running


class AdmittedStream:
    """An engine's delta stream that returns its admission places exactly once.

    ``source`` yields the deltas; the first delta of each choice moves that choice from waiting to
    running. Closing this stream closes ``source`` (which aborts the request in the engine).
    """

    def __init__(self, source: AsyncIterator[ChoiceDelta], admission: Admission, sequences: int) -> None:
        self._source = source
        self._admission = admission
        self._waiting = sequences
        self._running = 0
        self._started: set[int] = set()
        self._released = False

    def __aiter__(self) -> AdmittedStream:
        return self

    async def __anext__(self) -> ChoiceDelta:
        try:
            delta = await self._source.__anext__()
        except BaseException:  # StopAsyncIteration included: the request is over either way
            self._release()
            raise
        if delta.index not in self._started and self._waiting:
            self._started.add(delta.index)
            self._waiting -= 1
            self._running += 1
            self._admission.started(1)
        return delta

    async def aclose(self) -> None:
        try:
            aclose: Callable[[], Any] | None = getattr(self._source, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._admission.release(self._waiting, self._running)


class ChoiceDecoder:
    """One choice's new token ids (and logprobs) in, ``ChoiceDelta`` out, stop strings applied here.

    ``stopped`` turns true when a stop string appears: the caller then aborts the engine's request
    (an engine that knows the stop strings has stopped by itself at the same token).
    """

    def __init__(self, index: int, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.index = index
        self.consumed = 0  # token ids taken so far (cumulative streams slice from here)
        self.finished = False
        self.stopped = False
        self._detok = IncrementalDetokenizer(tokenizer, stop)

    def feed(
        self, token_ids: list[int], logprobs: list[TokenLogprobs] | None, finish_reason: str | None
    ) -> ChoiceDelta | None:
        """Take the new tokens; return the delta to emit (None when there is nothing to say yet)."""
        if self.finished:
            return None
        text, taken = "", 0
        for token_id in token_ids:
            piece, hit = self._detok.add(token_id)
            text, taken = text + piece, taken + 1
            if hit:
                self.stopped = True
                finish_reason = "stop"
                break
        self.consumed += taken
        if finish_reason is not None and not self.stopped:
            text += self._detok.flush()
        self.finished = finish_reason is not None
        if not taken and not self.finished:
            return None
        return ChoiceDelta(
            index=self.index,
            text=text,
            token_ids=list(token_ids[:taken]),
            logprobs=None if logprobs is None else logprobs[:taken],
            finish_reason=finish_reason,
        )


def engine_args_from_cli_parser(
    parser: argparse.ArgumentParser,
    raw: Mapping[str, str],
    *,
    engine: str,
    owned: Mapping[str, str],
) -> dict[str, Any]:
    """Convert ``KEY=VALUE`` strings with the types, choices and flags of an engine's own CLI parser.

    ``KEY`` may use dashes or underscores (``tensor-parallel-size`` = ``tensor_parallel_size``).
    ``owned`` maps settings omniserve sets itself to the omniserve option to use instead, so one
    setting never has two sources. Raises ``ModelLoadError`` naming the key, the engine and the fix.
    """
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in ("help", argparse.SUPPRESS):
            continue
        aliases = [o.lstrip("-").replace("-", "_") for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse.BooleanOptionalAction):
            aliases = [a for a in aliases if not a.startswith("no_")]  # the value says true or false
        for name in (action.dest, *aliases):
            actions.setdefault(name, action)  # long aliases too: --tensor-parallel-size for tp_size
    parsed: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.strip().lstrip("-").replace("-", "_")
        action = actions.get(name)
        dest = action.dest if action is not None else name
        if dest in owned:
            raise ModelLoadError(f"--engine-arg {key}: omniserve sets this for {engine} itself; use {owned[dest]}")
        if action is None:
            close = difflib.get_close_matches(dest, [a for a in actions if len(a) > 2], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; see `{engine}` --help for its engine args"
            raise ModelLoadError(f"--engine-arg {key}: {engine} has no engine argument {dest!r}{hint}")
        try:
            parsed[dest] = _convert(action, value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ModelLoadError(f"--engine-arg {key}={value!r}: {engine} rejects this value: {exc}") from exc
    return parsed


def _convert(action: argparse.Action, value: str) -> Any:
    """One value as the parser would store it; flags take true/false."""
    if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction
        word = value.strip().lower()
        if word not in _TRUE | _FALSE:
            raise ValueError("expected true or false")
        flag = word in _TRUE
        return (not flag) if isinstance(action, argparse._StoreFalseAction) else flag
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = [v for v in value.replace(",", " ").split() if v]
        return [_convert_one(action, v) for v in items]
    return _convert_one(action, value)


def _convert_one(action: argparse.Action, value: str) -> Any:
    converted = action.type(value) if callable(action.type) else value
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
    return converted
