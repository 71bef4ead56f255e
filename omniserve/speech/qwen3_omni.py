"""Qwen3-Omni's speech half: the thinker reads the text as its own reply, the talker (a MoE decoder) turns the
thinker's hidden states into the first codebook's codes, its code predictor adds the other codebooks of each
frame, and code2wav (a causal ConvNet, no diffusion) turns the frames into 24 kHz samples.

As for Qwen2.5-Omni (``speech.qwen2_5_omni``), ``Qwen3OmniMoeForConditionalGeneration.generate`` is reused whole,
since that is where transformers wires the thinker's hidden states into the talker: the thinker's "generation"
is forced, one allowed token per step (``prefix_allowed_tokens_fn``), to the text to speak and ``<|im_end|>``.
Its hidden states are those of the model having written the text itself; the talker, code predictor and code2wav
run as the model's own code runs them. Voices are the checkpoint's speakers (``talker_config.speaker_id``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from omniserve.models.loading import generating_module
from omniserve.speech.base import Speech
from omniserve.speech.forced_reply import forced_reply, load_model_and_processor, prompt_ids, stop_after

SAMPLE_RATE = 24_000
#: Samples per codec frame in the published code2wav (upsampling 8*5*4*3 * 2*2): 12.5 frames a second.
SAMPLES_PER_CODE = 1920
#: The user turn the spoken reply answers when the request gives no ``instructions``.
DEFAULT_INSTRUCTION = "Read the following text aloud."
#: Upper bound on frames per character of text: generous (speech runs near 15 characters a second, under one
#: frame each), so the cap only stops a talker that would not end, never a real utterance.
_CODES_PER_CHAR = 3
_MIN_CODES = 25
#: ``generate`` takes a frame's other codebooks from the step after its first code was sampled: the talker needs
#: two steps before its first frame exists (an end code before that leaves code2wav nothing to decode).
_MIN_TALKER_STEPS = 2


class Qwen3OmniSpeech:
    """A loaded Qwen3-Omni (thinker + talker + code2wav) and its processor. Not thread-safe: one call at a time."""

    def __init__(self, model: Any, processor: Any) -> None:
        self._model = model
        self._processor = processor
        self._tokenizer = processor.tokenizer
        self._im_end = model.config.im_end_token_id
        self._lock = threading.Lock()  # generate keeps per-call state on the talker (rope deltas): one at a time

    @classmethod
    def load(cls, path: Path, *, dtype: str, device: str) -> Qwen3OmniSpeech:
        return cls(*load_model_and_processor(path, dtype=dtype, device=device))

    @property
    def voices(self) -> tuple[str, ...]:
        return tuple(self._model.config.talker_config.speaker_id or {})

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    def synthesize(
        self, text: str, *, voice: str, instructions: str | None, max_seconds: float, stop: Callable[[], bool]
    ) -> Speech:
        import torch
        from transformers import StoppingCriteriaList

        prompt = self._prompt(instructions)
        start = len(prompt)
        reply = forced_reply(self._tokenizer, text, start=start, im_end=self._im_end)
        seconds_cap = int(max_seconds * SAMPLE_RATE / SAMPLES_PER_CODE)
        max_codes = max(_MIN_TALKER_STEPS, min(seconds_cap, _MIN_CODES + _CODES_PER_CHAR * len(text)))
        device = generating_module(self._model).device
        input_ids = torch.tensor([prompt], device=device)
        with self._lock, torch.inference_mode():
            _, waveform = self._model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                speaker=voice,
                return_audio=True,
                thinker_max_new_tokens=len(reply.ids),
                thinker_eos_token_id=self._im_end,
                thinker_do_sample=False,
                thinker_prefix_allowed_tokens_fn=reply.allowed,
                # the talker reads the assistant turn's first generated token: at least one
                thinker_stopping_criteria=StoppingCriteriaList([stop_after(start + 1, stop)]),
                # one step more than the frames kept: the last sampled code never gets its other codebooks
                talker_max_new_tokens=max_codes + 1,
                talker_min_new_tokens=_MIN_TALKER_STEPS,
                talker_stopping_criteria=StoppingCriteriaList([stop_after(_MIN_TALKER_STEPS, stop)]),
            )
        samples = waveform.detach().to("cpu", torch.float32).reshape(-1).numpy()
        return Speech(
            samples=np.clip(samples, -1.0, 1.0),
            sample_rate=SAMPLE_RATE,
            input_tokens=start + len(reply.ids),
            output_tokens=round(len(samples) / SAMPLES_PER_CODE),
        )

    def _prompt(self, instructions: str | None) -> list[int]:
        """The chat up to the assistant's turn, in the checkpoint's own template."""
        messages = [{"role": "user", "content": [{"type": "text", "text": instructions or DEFAULT_INSTRUCTION}]}]
        return prompt_ids(self._processor, messages)


def load(path: Path, *, dtype: str, device: str) -> Qwen3OmniSpeech:
    """The family's entry point (``omniserve.speech.detect.FAMILIES``)."""
    return Qwen3OmniSpeech.load(path, dtype=dtype, device=device)
