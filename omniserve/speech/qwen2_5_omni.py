"""Qwen2.5-Omni's speech half: the thinker reads the text as its own reply, the talker turns the thinker's
hidden states into codec codes, token2wav (a DiT to mel, BigVGAN to 24 kHz samples) into a waveform.

It reuses ``Qwen2_5OmniForConditionalGeneration.generate`` whole, which is where transformers wires the
thinker's hidden states into the talker: the thinker's "generation" is forced, one allowed token per step
(``prefix_allowed_tokens_fn``), to the text to speak followed by ``<|im_end|>``. Its hidden states are
then exactly those of the model having written that text itself, and the talker and codec run as the
model's own code runs them. The cost is one thinker step per text token, as when the model answers.
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
#: Codec codes per second of audio: 2 mel frames per code, 240 samples per frame at 24 kHz.
CODES_PER_SECOND = 50
#: The system prompt Qwen2.5-Omni was trained to speak under (its model card: other prompts may not speak).
SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)
#: The user turn the spoken reply answers when the request gives no ``instructions``.
DEFAULT_INSTRUCTION = "Read the following text aloud."
#: Upper bound on codes per character of text: generous (speech runs near 15 characters a second, ~3.3
#: codes each), so the cap only stops a talker that would not end, never a real utterance.
_CODES_PER_CHAR = 8
_MIN_CODES = 50


class Qwen25OmniSpeech:
    """A loaded Qwen2.5-Omni (thinker + talker + token2wav) and its processor. Not thread-safe: one call at a time."""

    def __init__(self, model: Any, processor: Any) -> None:
        self._model = model
        self._processor = processor
        self._tokenizer = processor.tokenizer
        self._im_end = self._tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._lock = threading.Lock()  # generate keeps per-call state on the model: never two at once

    @classmethod
    def load(cls, path: Path, *, dtype: str, device: str) -> Qwen25OmniSpeech:
        return cls(*load_model_and_processor(path, dtype=dtype, device=device))

    @property
    def voices(self) -> tuple[str, ...]:
        return tuple(self._model.speaker_map)

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
        talker = self._model.talker
        max_codes = int(min(max_seconds * CODES_PER_SECOND, _MIN_CODES + _CODES_PER_CHAR * len(text)))
        device = generating_module(self._model).device
        input_ids = torch.tensor([prompt], device=device)
        with self._lock, torch.inference_mode():
            _, waveform = self._model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                speaker=voice,
                thinker_max_new_tokens=len(reply.ids),
                thinker_do_sample=False,
                thinker_prefix_allowed_tokens_fn=reply.allowed,
                # generate builds the talker's input from the thinker's second reply token on: keep two
                thinker_stopping_criteria=StoppingCriteriaList([stop_after(start + 2, stop)]),
                talker_max_new_tokens=max_codes,
                talker_min_new_tokens=1,  # an end code first would leave the codec nothing to decode
                talker_eos_token_id=[talker.codec_pad_token, talker.codec_eos_token],
                talker_stopping_criteria=StoppingCriteriaList([stop_after(start + 2 + 1, stop)]),
            )
        samples = waveform.detach().to("cpu", torch.float32).numpy()
        codes = round(len(samples) * CODES_PER_SECOND / SAMPLE_RATE)
        return Speech(
            samples=np.clip(samples, -1.0, 1.0),
            sample_rate=SAMPLE_RATE,
            input_tokens=start + len(reply.ids),
            output_tokens=codes,
        )

    def _prompt(self, instructions: str | None) -> list[int]:
        """The chat up to the assistant's turn, in the checkpoint's own template."""
        messages = [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "text", "text": instructions or DEFAULT_INSTRUCTION}]},
        ]
        return prompt_ids(self._processor, messages)


def load(path: Path, *, dtype: str, device: str) -> Qwen25OmniSpeech:
    """The family's entry point (``omniserve.speech.detect.FAMILIES``)."""
    return Qwen25OmniSpeech.load(path, dtype=dtype, device=device)
