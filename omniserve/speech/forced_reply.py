"""What the Omni talkers share: the thinker forced to read a text as its own reply, inside the model's ``generate``.

Qwen2.5-Omni and Qwen3-Omni wire the thinker's hidden states into the talker only inside their ``generate``, so
both speech modules call it whole with the thinker's "generation" forced, one allowed token per step
(``prefix_allowed_tokens_fn``), to the text followed by ``<|im_end|>``, and stop it early when the request is
cancelled. What differs per family (prompt, talker limits, codec rate) stays in the family's module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniserve.models.loading import load_checkpoint, refuse_missing


def load_model_and_processor(path: Path, *, dtype: str, device: str) -> tuple[Any, Any]:
    """The full checkpoint (thinker, talker, codec), every weight present, and its processor."""
    from transformers import AutoProcessor

    loaded = load_checkpoint(path, dtype=dtype, device=device, allow_auto_dtype=True)
    refuse_missing(path, loaded.report)
    return loaded.model, AutoProcessor.from_pretrained(str(path))


def prompt_ids(processor: Any, messages: list[dict[str, Any]]) -> list[int]:
    """The chat up to the assistant's turn, in the checkpoint's own template."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor.tokenizer(text, add_special_tokens=False).input_ids


@dataclass(frozen=True)
class ForcedReply:
    """The reply's token ids (the text, then ``<|im_end|>``) and the function that forces them after ``start``."""

    ids: list[int]
    start: int  # the prompt's length: the reply's first token is generated at this position
    end: int  # ``<|im_end|>``: allowed once the text is read

    def allowed(self, _batch: int, sequence: Any) -> list[int]:
        """``prefix_allowed_tokens_fn``: the one token the thinker may write next."""
        step = sequence.shape[-1] - self.start
        return [self.ids[step] if step < len(self.ids) else self.end]


def forced_reply(tokenizer: Any, text: str, *, start: int, im_end: int) -> ForcedReply:
    """``text`` as the thinker's reply; ``split_special_tokens``: ``<|im_end|>`` in the text is spoken, never ends
    the reply early."""
    spoken = tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    return ForcedReply([*spoken, im_end], start, im_end)


def stop_after(after: int, stop: Callable[[], bool]) -> Any:
    """A ``StoppingCriteria`` that ends generation once ``stop()`` holds, but not before the sequence is ``after``
    tokens long (the talker needs the thinker's first reply tokens, the codec at least one frame)."""
    import torch
    from transformers import StoppingCriteria

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
            done = input_ids.shape[1] >= after and stop()
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return _Stop()
