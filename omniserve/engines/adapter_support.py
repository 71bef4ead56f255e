"""What adapters over an external engine package (vLLM, SGLang, LMDeploy) share beyond ``Engine``.

- ``InProcessEngine``: an ``Engine`` whose native engine comes from a package and runs in the
  gateway's process: the package checked at construction (a missing one fails before anything
  loads), and a failed start turned into one ``ModelLoadError`` that quotes the engine's own error,
  even one its child processes printed.
- ``ChoiceDecoder``: for engines that stream token ids (SGLang, LMDeploy), the text of one choice
  made by omniserve's own detokenizer, so stop strings, held-back partial characters and
  ``skip_special_tokens`` behave exactly as with the transformers engine.
- ``engine_args_from_cli_parser``: ``--engine-arg KEY=VALUE`` checked and converted by the
  engine's own command-line parser, so omniserve accepts exactly what ``vllm serve`` /
  ``python -m sglang.launch_server`` accept, with their types and choices, and says so before the
  engine starts.

Generation, admission, readiness and stats are ``Engine``'s (``base.py``); an adapter fills in
``launch``, ``shutdown``, ``prepare`` and ``stream``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from omniserve.config import EngineConfig
from omniserve.engines.base import ChoiceDelta, Engine, NativeT, TokenLogprobs
from omniserve.engines.child_output import ChildOutputTail
from omniserve.engines.detokenizer import IncrementalDetokenizer
from omniserve.errors import ModelLoadError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class InProcessEngine(Engine[NativeT]):
    """An external engine package running in the gateway's process.

    Subclasses set ``NAME``, ``PACKAGE`` (imported at construction) and ``INSTALL_HINT``, build the
    native engine inside ``with self._starting():`` in ``launch``, and keep the served model's
    tokenizer in ``_tokenizer`` (for text and logprobs made by omniserve).
    """

    PACKAGE: ClassVar[str]
    INSTALL_HINT: ClassVar[str]

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        try:
            importlib.import_module(self.PACKAGE)
        except ImportError as exc:
            raise ModelLoadError(
                f"the {self.NAME} engine cannot serve {config.model}: the {self.PACKAGE} package is not installed "
                f"({exc}); {self.INSTALL_HINT}"
            ) from exc
        self._tokenizer: Any = None

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


class ChoiceDecoder:
    """One choice's new token ids (and logprobs) in, ``ChoiceDelta`` out, stop strings applied here.

    ``stopped`` turns true when a stop string appears: the caller then aborts the engine's request
    (an engine that knows the stop strings has stopped by itself at the same token).
    """

    def __init__(self, index: int, tokenizer: Any, stop: tuple[str, ...], keep_special: tuple[str, ...] = ()) -> None:
        self.index = index
        self.consumed = 0  # token ids taken so far (cumulative streams slice from here)
        self.finished = False
        self.stopped = False
        # ``keep_special``: the control tokens a tool parser reads (``SamplingParams.keep_special``) stay in the text
        self._detok = IncrementalDetokenizer(tokenizer, stop, keep_special)

    def feed(
        self, token_ids: list[int], logprobs: list[TokenLogprobs] | None, finish_reason: str | None
    ) -> ChoiceDelta | None:
        """Take the new tokens; return the delta to emit (None when there is nothing to say yet)."""
        if self.finished:
            return None
        pieces: list[str] = []  # joined once: an engine may hand over many tokens at a time
        taken = 0
        for token_id in token_ids:
            piece, hit = self._detok.add(token_id)
            pieces.append(piece)
            taken += 1
            if hit:
                self.stopped = True
                finish_reason = "stop"
                break
        self.consumed += taken
        if finish_reason is not None and not self.stopped:
            pieces.append(self._detok.flush())
        text = "".join(pieces)
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
    # argparse has no public way to list a parser's arguments; ``_actions`` is the list its own help
    # and parsing read, which shell-completion tools (argcomplete) also rely on. Recording the
    # actions through the public ``add_argument`` is no alternative: arguments added to groups
    # (vLLM and SGLang use groups for almost all) go through the group, never the parser.
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
        return (not flag) if action.const is False else flag  # store_false stores const False when given
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = [v for v in value.replace(",", " ").split() if v]
        return [_convert_one(action, v) for v in items]
    return _convert_one(action, value)


def _convert_one(action: argparse.Action, value: str) -> Any:
    converted = action.type(value) if callable(action.type) else value
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
    return converted
