"""Media prompts of the families with padded pixel batches join one prefill pass; audio goes through the encoder cache.

The engine runs in-process on each family's tiny checkpoint (built once per module with its publisher's
template): image prompts whose processor outputs need padding to share a pass (LLaVA-NeXT/OneVision's tiles per
image, Pixtral's image heights and widths, Idefics3's images per prompt with its pixel mask, Gemma 3's token
types) are prefilled in one pass and answer exactly what each answers alone; so do Qwen2-Audio's clips. The
encoder-cache tests count the real audio tower's passes (a hook on its first convolution: the cache shadows
the method around it) on the tiny Qwen2.5-Omni and Qwen2-Audio.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from omniserve.engines.transformers_engine import TransformersEngine
from omniserve.media.loader import MediaItem
from omniserve.templates.render import RenderedPrompt
from tests.test_engine_batching import Output, same_outputs, serve_together

#: The families whose image prompts joined a batched prefill only once padded layouts were known.
PADDED_FAMILIES = ["llava_onevision", "llava_next_video", "gemma3", "idefics3", "mistral3"]


def _renderer(model: Path) -> Callable[[list[MediaItem], str], RenderedPrompt]:
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(model)
    part = {"image": {"type": "image"}, "video": {"type": "video"}, "audio": {"type": "audio_url", "audio_url": {}}}

    def user(items: list[MediaItem], text: str) -> RenderedPrompt:
        content = [*(part[item.kind] for item in items), {"type": "text", "text": text}]
        return renderer.render_chat([{"role": "user", "content": content}], items)

    return user


@pytest.mark.parametrize("name", PADDED_FAMILIES)
def test_image_prompts_needing_padding_are_prefilled_together_and_answer_as_alone(
    name: str, family_model: Callable[[str], Path]
) -> None:
    """Square, wide and tall images (different tile counts, heights and widths) and a prompt with two images share one
    pass; with videos, the two of one frame count share another and the longer one goes alone (its frames could only
    be padded into features no placeholder takes). Every answer equals the one its prompt gets alone."""
    import numpy as np
    from PIL import Image

    from omniserve.media.video import DecodedVideo
    from omniserve.models.families import get

    model = family_model(name)
    user = _renderer(model)
    rng = np.random.default_rng(5)

    def image(height: int, width: int) -> MediaItem:
        return MediaItem("image", Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))

    def video(count: int, size: int) -> MediaItem:
        frames = rng.integers(0, 255, (count, size, size, 3), dtype=np.uint8)
        return MediaItem("video", DecodedVideo(frames, 2.0, tuple(0.25 + 0.5 * i for i in range(count)), count / 2))

    prompts = [
        user([image(56, 56)], "what is it?"),
        user([image(40, 120)], "describe this wide picture"),
        user([image(120, 40), image(56, 56)], "compare the two"),
        user([image(28, 56)], "and this small one?"),
        user([], "no media at all"),
    ]
    passes = {4: 1}
    if "video" in get(name).modalities:
        prompts += [
            user([video(4, 56)], "what moves?"),
            user([video(4, 84)], "and here?"),
            user([video(6, 56)], "and in this longer one?"),
        ]
        passes = {4: 1, 2: 1, 1: 1}
    alone, _ = serve_together(model, [[p] for p in prompts])
    assert _distinct(alone) == len(prompts)  # the test can fail: a row answered from another's inputs differs
    together, engine = serve_together(model, [prompts])
    same_outputs(together, alone)
    assert engine.media_passes == passes


def _distinct(outputs: list[Output]) -> int:
    """How many answers differ (tokens, or logprobs by more than ``same_outputs`` allows)."""
    return len({(tuple(tokens), tuple(round(lp, 3) for lp in logprobs)) for tokens, logprobs in outputs})


def _clips(seed: int, *seconds: float) -> list[MediaItem]:
    import numpy as np

    from omniserve.media.audio import DecodedAudio

    rng = np.random.default_rng(seed)
    return [
        MediaItem("audio", DecodedAudio((0.3 * rng.standard_normal(int(16_000 * s))).astype(np.float32), 16_000))
        for s in seconds
    ]


def test_qwen2_audio_clips_are_prefilled_together_and_answer_as_alone(family_model: Callable[[str], Path]) -> None:
    """Qwen2-Audio pads every clip to one length (its tower wants 30 s of frames) with a mask: clips of different
    lengths, and two clips in one prompt, share one pass and answer as alone."""
    model = family_model("qwen2_audio")
    user = _renderer(model)
    short, long, first, second = _clips(1, 0.6, 1.7, 1.1, 0.4)
    prompts = [
        user([short], "what is it?"),
        user([long], "and this longer one?"),
        user([first, second], "compare the sounds"),
        user([], "no media"),
    ]
    alone, _ = serve_together(model, [[p] for p in prompts])
    assert _distinct(alone) == len(prompts)
    together, engine = serve_together(model, [prompts])
    same_outputs(together, alone)
    assert engine.media_passes == {3: 1}


def _serve_counting_audio_tower(model: Path, groups: list[list[RenderedPrompt]], calls: list[int]) -> Any:
    """``serve_together``, counting the real audio tower's passes with a hook on its first convolution."""
    original_load = TransformersEngine._load

    def load(engine: TransformersEngine) -> Any:
        import torch

        info = original_load(engine)
        tower = next(m for n, m in engine._loaded.model.named_modules() if n.endswith("audio_tower"))
        conv = next(m for m in tower.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)))
        conv.register_forward_hook(lambda *_: calls.append(1))
        return info

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TransformersEngine, "_load", load)
        return serve_together(model, groups)


@pytest.mark.parametrize("checkpoint", ["tiny_omni", "qwen2_audio", "qwen3_omni"])
def test_a_repeated_clip_is_encoded_once_and_a_different_clip_of_equal_length_never_hits(
    checkpoint: str, request: pytest.FixtureRequest, family_model: Callable[[str], Path]
) -> None:
    """Two different clips of the same length, then the first again behind another question (the question comes
    first, so no prefix covers the clip): the second clip is encoded though its length and placeholders equal the
    first's, the repeated one comes from the cache, and every answer equals the uncached engine's."""
    model = request.getfixturevalue(checkpoint) if checkpoint.startswith("tiny_") else family_model(checkpoint)
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(model)
    part = {"type": "audio_url", "audio_url": {}} if checkpoint == "qwen2_audio" else {"type": "audio"}

    def ask(question: str, clip: MediaItem) -> RenderedPrompt:
        content = [{"type": "text", "text": question}, part]
        return renderer.render_chat([{"role": "user", "content": content}], [clip])

    (one,), (other,) = _clips(7, 0.8), _clips(8, 0.8)
    groups = [[ask("listen", one)], [ask("listen", other)], [ask("and what do you hear in this one", one)]]
    assert groups[0][0].token_ids == groups[1][0].token_ids  # only the clips' contents tell them apart
    expected, _ = serve_together(model, groups, prefix_cache_tokens=0, encoder_cache_items=0)
    assert expected[0] != expected[1]

    calls: list[int] = []
    got, engine = _serve_counting_audio_tower(model, groups, calls)
    same_outputs(got, expected)
    assert engine._encoders.encoded == 2 and engine._encoders.hits == 1
    assert len(calls) == 2  # the third prompt's clip came from the cache
