"""The encoder cache for every family whose image (and video) features come from a feature method.

Each family's tiny checkpoint (built once per module with its publisher's template) is served in-process twice, the
same groups of prompts in the same order: once with ``encoder_cache_items=0`` and once with the cache on (prefix
caching off in both, so nothing else reuses work). Greedy answers must be equal; the cache's counters and a hook on
the real vision tower, read after every group, show what was encoded and what came from the cache: two different
images of one size never share an entry (the second is encoded), the first met again behind another question is
not encoded again, a pass with one image new and one known encodes only the new one, and a pass of two new images
encodes both in one call (or, for a tower whose output does not split per item, the cache learns to encode them one
call each). Families whose towers the cache does not cover (Mllama, Phi-4-multimodal, Qwen3-VL) are checked to
pass through: answers equal, nothing cached.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from omniserve.config import EngineConfig
from omniserve.engines.base import GenerationRequest
from omniserve.engines.transformers_engine import TransformersEngine
from omniserve.media.loader import MediaItem
from omniserve.sampling import SamplingParams
from omniserve.templates.render import RenderedPrompt
from tests.test_engine_batching import Output, same_outputs

#: The families whose images (and videos) go through ``get_image_features`` / ``get_video_features``.
CACHED = [
    "llava",
    "llava_onevision",
    "llava_next_video",
    "gemma3",
    "gemma3n",
    "idefics3",
    "internvl",
    "mistral3",
    "glm4v",
    "qwen3_vl",  # DeepStack features beside the embeddings, cut per item too
    "qwen3_omni",
]
#: Families the cache leaves alone (no feature method, or a tower that is not batch-invariant).
UNCACHED = ["mllama", "phi4_multimodal"]
#: The module names of the families' vision towers (for counting their passes).
TOWERS = ("vision_tower", "vision_model", "visual", "img_processor")


Step = tuple[int, int, int]  # after a group: (items encoded, items served from the cache, vision tower passes)


def _serve(model: Path, groups: list[list[RenderedPrompt]], **options: Any) -> tuple[list[Output], list[Step], Any]:
    """Each group's prompts admitted together, group after group; every prompt's greedy tokens and logprobs, the
    counters after each group, and the engine's encoder cache (None when off)."""
    calls: list[int] = []

    async def one(stream: Any) -> Output:
        tokens: list[int] = []
        logprobs: list[float] = []
        async for delta in stream:
            tokens.extend(delta.token_ids)
            logprobs.extend(lp.logprob for lp in delta.logprobs or [])
        return tokens, logprobs

    async def scenario() -> tuple[list[Output], list[Step], Any]:
        config = EngineConfig(
            model=model, served_model_name="tiny", dtype="float32", max_concurrency=8, prefix_cache_tokens=0, **options
        )
        engine = TransformersEngine(config)
        await engine.start()
        _unzero(engine._loaded.model)
        towers = [m for n, m in engine._loaded.model.named_modules() if n.rsplit(".", 1)[-1] in TOWERS]
        towers[0].register_forward_hook(lambda *_: calls.append(1))  # after the warm-up
        try:
            outputs: list[Output] = []
            steps: list[Step] = []
            for group in groups:
                params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True)
                requests = [
                    GenerationRequest(
                        request_id=f"r{len(outputs) + i}",
                        prompt=RenderedPrompt(token_ids=list(p.token_ids), mm_inputs=dict(p.mm_inputs)),
                        sampling=params,
                    )
                    for i, p in enumerate(group)
                ]
                interval = sys.getswitchinterval()  # every request queued before the worker looks: admitted together
                sys.setswitchinterval(5.0)
                try:
                    streams = engine.generate_all(requests)
                finally:
                    sys.setswitchinterval(interval)
                outputs.extend(await asyncio.gather(*(one(s) for s in streams)))
                cache = engine._encoders
                steps.append((cache.encoded, cache.hits, len(calls)) if cache is not None else (0, 0, len(calls)))
            return outputs, steps, engine._encoders
        finally:
            await engine.stop()

    return asyncio.run(scenario())


def _unzero(model: Any) -> None:
    """Fixed random values (the same in every run) for the matrices the tiny builders leave at zero, as transformers
    initialises them: Gemma 3's ``mm_input_projection_weight`` makes every image's embeddings equal, and a test of
    which image's embeddings a prompt got could not fail."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.ndim >= 2 and not parameter.any():
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))


def _prompts(model: Path, kind: str) -> dict[str, Callable[[str, Any], RenderedPrompt]]:
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(model)

    def ask(question: str, media: Any) -> RenderedPrompt:
        # (templates may put the image first: prefix caching is off in these runs, so only the encoder cache reuses)
        content = [{"type": "text", "text": question}, {"type": kind}]
        return renderer.render_chat([{"role": "user", "content": content}], [MediaItem(kind, media)])

    return {"ask": ask}


def _images(seed: int, count: int) -> list[Any]:
    """``count`` different 56x56 images (one size: one token count, one tile layout) of 4x4 coloured blocks: coarse
    enough that towers pooling to few tokens still tell them apart."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (count, 4, 4, 3), dtype=np.uint8)
    return [Image.fromarray(b.repeat(14, axis=0).repeat(14, axis=1)) for b in blocks]


@pytest.mark.parametrize("name", CACHED)
def test_a_repeated_image_is_encoded_once_and_a_different_image_of_one_size_never_hits(
    name: str, family_model: Callable[[str], Path]
) -> None:
    """X, Y (same size, other pixels), X behind another question, then Z (new) with Y (known) in one pass, then two
    new images W1, W2 in one pass and both again: answers equal the uncached engine's, and each step encodes exactly
    the new images (u units each: an image, or its tiles), the known ones served from the cache."""
    from omniserve.models.families import get

    model = family_model(name)
    ask = _prompts(model, "image")["ask"]
    x, y, z, w1, w2 = _images(3, 5)
    groups = [
        [ask("what is it?", x)],
        [ask("what is it?", y)],
        [ask("and what do you see in this one", x)],
        [ask("describe", z), ask("tell me about", y)],
        [ask("first", w1), ask("second", w2)],
        [ask("again the first", w1), ask("again the second", w2)],
    ]
    assert groups[0][0].token_ids == groups[1][0].token_ids  # only the images' pixels tell X and Y apart
    if "video" in get(name).modalities:
        ask_video = _prompts(model, "video")["ask"]
        clip = _video(9)
        groups += [[ask_video("what moves?", clip)], [ask_video("and what happens here", clip)]]
    expected, _, off = _serve(model, groups, encoder_cache_items=0)
    assert off is None and expected[0] != expected[1]  # the test can fail: X and Y make different answers

    got, steps, cache = _serve(model, groups)
    same_outputs(got, expected)
    (u, _, _), *_ = steps
    assert u > 0 and len(cache) > 0
    deltas = [
        tuple(b - a for a, b in zip(before, after, strict=True))
        for before, after in zip([(0, 0, 0), *steps[:-1]], steps, strict=True)
    ]
    assert deltas[:4] == [(u, 0, 1), (u, 0, 1), (0, u, 0), (u, u, 1)]  # Y never hits X's entry; Z alone is encoded
    if cache._alone:  # the two new images' output did not split per item: used as is, then one call per image
        assert deltas[4:6] == [(0, 0, 1), (2 * u, 0, 2)]
    else:
        assert deltas[4:6] == [(2 * u, 0, 1), (0, 2 * u, 0)]
    if len(deltas) > 6:  # the video again behind another question: from the cache
        assert deltas[6][0] > 0 and deltas[6][2] == 1 and deltas[7] == (0, deltas[6][0], 0)


def _video(seed: int) -> Any:
    import numpy as np

    from omniserve.media.video import DecodedVideo

    frames = np.random.default_rng(seed).integers(0, 255, (4, 56, 56, 3), dtype=np.uint8)
    return DecodedVideo(frames, 2.0, tuple(0.25 + 0.5 * i for i in range(4)), 2.0)


@pytest.mark.parametrize("name", UNCACHED)
def test_towers_the_cache_does_not_cover_pass_through(name: str, family_model: Callable[[str], Path]) -> None:
    """Mllama (its tower is called in the forward itself, its output cross-attention states) and Phi-4-multimodal (no
    feature method; a tower that is not batch-invariant): the same image twice is encoded twice, nothing is kept,
    and the answers are the uncached engine's."""
    model = family_model(name)
    ask = _prompts(model, "image")["ask"]
    (x,) = _images(4, 1)
    groups = [[ask("what is it?", x)], [ask("and what do you see in this one", x)]]
    expected, _, _ = _serve(model, groups, encoder_cache_items=0)
    got, steps, cache = _serve(model, groups)
    same_outputs(got, expected)
    assert len(cache) == 0 and cache.hits == 0 and steps[-1][2] == 2


def test_a_prompts_images_are_one_entry_where_the_method_counts_images_per_prompt(
    family_model: Callable[[str], Path],
) -> None:
    """LLaVA-OneVision tiles an image only when its prompt has no other (``batch_num_images``; omniserve's renderer
    hands images over flat, one per count, so the processor is called here with a prompt's images nested): a
    prompt's images are then one entry. X and Y together, X alone (its own entry: tiled, other embeddings), then X
    and Y together again behind another question (a hit) with a new pair in the same pass (encoded apart, with its
    count): answers equal the uncached engine's."""
    from transformers import AutoProcessor

    from omniserve.templates.render import PromptRenderer

    model = family_model("llava_onevision")
    processor = AutoProcessor.from_pretrained(model)
    renderer = PromptRenderer.from_pretrained(model)

    def ask(question: str, *images: Any) -> RenderedPrompt:
        content = [{"type": "text", "text": question}, *({"type": "image"} for _ in images)]
        if len(images) == 1:
            return renderer.render_chat([{"role": "user", "content": content}], [MediaItem("image", images[0])])
        messages = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[text], images=[list(images)], return_tensors="pt")
        assert inputs["batch_num_images"].tolist() == [len(images)]
        mm_inputs = {k: v for k, v in inputs.items() if k not in {"input_ids", "attention_mask"}}
        return RenderedPrompt(token_ids=inputs["input_ids"][0].tolist(), mm_inputs=mm_inputs)

    x, y, z, w = _images(6, 4)
    groups = [[ask("compare", x, y)], [ask("what is it?", x)], [ask("and these two", x, y), ask("compare", z, w)]]
    expected, _, _ = _serve(model, groups, encoder_cache_items=0)
    got, steps, _ = _serve(model, groups)
    same_outputs(got, expected)
    assert steps == [(1, 0, 1), (2, 0, 2), (3, 1, 3)]
