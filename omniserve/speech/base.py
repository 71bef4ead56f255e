"""What the speech component needs of a model family: its voices, its rate, text to waveform."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Speech:
    """One synthesized utterance: mono float32 samples in [-1, 1] and the tokens it took."""

    samples: np.ndarray
    sample_rate: int
    input_tokens: int  # the text spoken plus the prompt around it, as the thinker read them
    output_tokens: int  # codec codes the talker produced


class SpeechModel(Protocol):
    """A loaded talker + codec (and whatever conditions them). Calls block; the synthesizer runs them off the loop."""

    @property
    def voices(self) -> tuple[str, ...]: ...

    @property
    def sample_rate(self) -> int: ...

    def synthesize(
        self, text: str, *, voice: str, instructions: str | None, max_seconds: float, stop: Callable[[], bool]
    ) -> Speech:
        """Speak ``text`` in ``voice``; at most ``max_seconds`` of audio. ``stop()`` turning true ends the
        autoregressive steps early (cancellation, deadline): the caller then discards the result."""
