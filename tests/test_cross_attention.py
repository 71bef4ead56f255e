"""Cross-attention models in the transformers engine (``engines/cross_attention.py``), on a tiny Mllama.

Mllama's images reach the decoder through cross-attention layers whose keys and values (tiles x patches)
each cache row keeps beside its tokens, with the mask of the vision columns its later tokens attend to.
Image prompts (one tile or two, one image or two: rows of different widths), a text prompt (no images:
its cross-attention layers must leave it as untouched as skipping them does) are admitted together, join
the running batch at different steps and leave it at different steps (a wider row moves into a narrower
one's slot); every answer must equal the one its prompt gets alone, and alone must equal transformers'
own ``generate``; the ``n`` choices of an image request each carry its images. Image prompts never use the
prefix cache (their first tokens depend on the images too); text prompts still do. Training (batches padded
per sample, tests/test_train_batches.py) is a column of the family matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from omniserve.templates.render import RenderedPrompt
from tests.test_engine_batching import same_outputs, serve_together
from tests.test_train_support import published_template


@pytest.fixture(scope="module")
def tiny_mllama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from omniserve.models.families import get

    return get("mllama").build(tmp_path_factory.mktemp("mllama") / "tiny-mllama", published_template("mllama"))


@pytest.fixture(scope="module")
def prompts(tiny_mllama: Path) -> list[RenderedPrompt]:
    """A square image (one tile), a wide one (two tiles), two images in one prompt, and a text prompt."""
    import numpy as np
    from PIL import Image

    from omniserve.media.loader import MediaItem
    from omniserve.templates.render import PromptRenderer

    renderer = PromptRenderer.from_pretrained(tiny_mllama)
    rng = np.random.default_rng(0)

    def image(width: int, height: int) -> MediaItem:
        return MediaItem("image", Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))

    def user(items: list[MediaItem], text: str) -> RenderedPrompt:
        content = [*({"type": item.kind} for item in items), {"type": "text", "text": text}]
        return renderer.render_chat([{"role": "user", "content": content}], items)

    return [
        user([image(64, 64)], "what is it?"),
        user([], "and now something without images"),
        user([image(64, 30)], "describe this picture in a few words"),
        user([image(64, 64), image(30, 64)], "compare them"),
    ]


@pytest.fixture(scope="module")
def alone(tiny_mllama: Path, prompts: list[RenderedPrompt]) -> list[Any]:
    outputs, engine = serve_together(tiny_mllama, [[p] for p in prompts], prefix_cache_tokens=0)
    assert engine.media_passes == {1: 3}
    return outputs


def test_the_model_is_found_to_cross_attend(tiny_mllama: Path, prompts: list[RenderedPrompt]) -> None:
    from omniserve.engines.hf_model import load_model, new_cache

    loaded = load_model(tiny_mllama)
    assert loaded.cross_attention is not None and loaded.cross_attention.layers == {1}
    cache = new_cache(loaded, 2)
    assert cache.get_seq_length(1) == 0  # no row holds images: the model skips the layer
    # the processor's mask: [1, tokens, images, tiles]; the tokens from the image on see its tiles
    mask = prompts[3].mm_inputs["cross_attention_mask"]
    assert mask.shape[2:] == (2, 2) and not mask[0, 0].any() and mask[0, -1].any()


def test_image_and_text_rows_answer_together_as_alone_and_as_transformers(
    tiny_mllama: Path, prompts: list[RenderedPrompt], alone: list[Any]
) -> None:
    # the test can fail: every prompt (each image) makes a different answer
    assert len({tuple(tokens) for tokens, _ in alone}) == len(prompts)
    together, engine = serve_together(tiny_mllama, [prompts], prefix_cache_tokens=0)
    assert engine.media_passes == {1: 3}  # each image prompt prefilled whole, joining the batch step after step
    same_outputs(together, alone)
    # the rows that leave first are the first image row and the text row: the two-image row (widest) moves into
    # the text row's slot; reversed, the widest joins first and the narrow rows move into its slot
    reordered, _ = serve_together(tiny_mllama, [prompts[::-1]], prefix_cache_tokens=0)
    same_outputs(reordered[::-1], alone)

    import torch
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(tiny_mllama, dtype=torch.float32).eval()
    for prompt, (tokens, _) in zip(prompts, alone, strict=True):
        ids = torch.tensor([prompt.token_ids])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **prompt.mm_inputs,
                max_new_tokens=len(tokens),
                min_new_tokens=len(tokens),
                do_sample=False,
            )
        assert out[0, ids.shape[1] :].tolist() == tokens


def test_image_prompts_bypass_the_prefix_cache_and_text_prompts_still_use_it(
    tiny_mllama: Path, prompts: list[RenderedPrompt], alone: list[Any]
) -> None:
    image, text = prompts[0], prompts[1]
    got, engine = serve_together(tiny_mllama, [[image, text], [image, text]], prefix_cache_tokens=8192)
    same_outputs(got, [alone[0], alone[1], alone[0], alone[1]])
    queries, hits = engine.prefix_cache_counts() or (0, 0)
    assert queries == 2 * len(text.token_ids)  # the image prompt was never looked up (nor stored)
    assert hits > 0


def test_choices_of_one_image_request_each_carry_its_images(
    tiny_mllama: Path, prompts: list[RenderedPrompt], alone: list[Any]
) -> None:
    """``n`` choices of an image request join as ``n`` rows copied from its one prefill, each with its images' keys
    and mask, beside a text request: every greedy choice answers what the request answers alone."""
    import asyncio

    from omniserve.config import EngineConfig
    from omniserve.engines.base import GenerationRequest
    from omniserve.engines.transformers_engine import TransformersEngine
    from omniserve.sampling import SamplingParams

    async def scenario() -> dict[tuple[int, int], list[int]]:
        engine = TransformersEngine(EngineConfig(model=tiny_mllama, served_model_name="tiny", dtype="float32"))
        await engine.start()
        try:
            requests = [
                GenerationRequest(
                    request_id=f"r{i}",
                    prompt=RenderedPrompt(token_ids=list(prompt.token_ids), mm_inputs=dict(prompt.mm_inputs)),
                    sampling=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, n=n),
                )
                for i, (prompt, n) in enumerate([(prompts[3], 3), (prompts[1], 1)])
            ]
            tokens: dict[tuple[int, int], list[int]] = {}
            for r, stream in enumerate(engine.generate_all(requests)):
                async for delta in stream:
                    tokens.setdefault((r, delta.index), []).extend(delta.token_ids)
            return tokens
        finally:
            await engine.stop()

    tokens = asyncio.run(scenario())
    assert sorted(tokens) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert all(tokens[0, i] == alone[3][0] for i in range(3))
    assert tokens[1, 0] == alone[1][0]
