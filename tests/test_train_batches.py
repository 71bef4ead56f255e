"""Training batches of several samples for models whose inputs do not simply concatenate.

Mllama lays its media out one row per sample (``cross_attention_mask`` [1, tokens, images, tiles] beside
``pixel_values`` [1, images, tiles, ...]): the collator pads them along tokens and images so that each
sample's loss in a batch is its loss alone. GLM-4.1V cannot take images and videos in one forward pass
(``Family.exclusive_media``): batches are planned so none holds both, a training sample holding both is
refused when the data is read, and the gateway refuses such a request with a 400.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from omniserve.train.collate import PaddingCollator, plan_batches, plan_packs_apart
from omniserve.train.features import Sample
from tests.conftest import RunningServer, start_server
from tests.media_factory import png_bytes, video_bytes
from tests.test_train_support import data_url, image_part, published_template, video_part, write_jsonl, write_media

IMAGE, VIDEO, TEXT = frozenset({"image"}), frozenset({"video"}), frozenset()
GLM4V_APART = frozenset({"image", "video"})
MLLAMA_APART = frozenset({"text", "image"})


# --------------------------------------------------------------------------- planning batches


def test_batches_are_the_data_order_when_nothing_conflicts() -> None:
    kinds = [IMAGE, TEXT, IMAGE, TEXT, IMAGE]
    assert plan_batches(kinds, 2, GLM4V_APART) == [[0, 1], [2, 3], [4]]
    assert plan_batches([VIDEO, IMAGE, VIDEO], 2, frozenset()) == [[0, 1], [2]]  # no exclusive inputs: runs


def test_no_batch_mixes_images_and_videos_and_the_order_is_kept_otherwise() -> None:
    kinds = [IMAGE, VIDEO, TEXT, VIDEO, IMAGE, TEXT, IMAGE]
    batches = plan_batches(kinds, 2, GLM4V_APART)
    assert batches == [[0, 2], [1, 3], [4, 5], [6]]
    assert sorted(i for batch in batches for i in batch) == list(range(len(kinds)))
    for batch in batches:
        assert not (IMAGE <= frozenset().union(*(kinds[i] for i in batch)) >= VIDEO)
    assert plan_batches(kinds, 3, GLM4V_APART) == [[0, 2, 4], [1, 3, 5], [6]]


def test_text_only_samples_stay_apart_from_image_samples_where_the_family_says_so() -> None:
    kinds = [IMAGE, TEXT, TEXT, IMAGE, IMAGE, TEXT]
    assert plan_batches(kinds, 2, MLLAMA_APART) == [[0, 3], [1, 2], [4], [5]]


def test_packs_hold_one_exclusive_input_each() -> None:
    kinds = [IMAGE, VIDEO, TEXT, IMAGE, VIDEO]
    packs = plan_packs_apart([10, 10, 10, 10, 10], kinds, 30, GLM4V_APART)
    assert packs == [[0, 3], [1, 4], [2]]
    assert plan_packs_apart([10, 10, 10], [IMAGE, TEXT, IMAGE], 30, frozenset()) == [[0, 1, 2]]


def test_a_sample_holding_two_exclusive_inputs_cannot_be_planned() -> None:
    with pytest.raises(ValueError, match="sample 1 holds image and video"):
        plan_batches([IMAGE, IMAGE | VIDEO], 2, GLM4V_APART)


# --------------------------------------------------------------------------- Mllama: per-sample media rows


@pytest.fixture(scope="module")
def tiny_mllama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from omniserve.models.families import get

    return get("mllama").build(tmp_path_factory.mktemp("mllama") / "tiny-mllama", published_template("mllama"))


@pytest.fixture(scope="module")
def mllama(tiny_mllama: Path) -> tuple[Any, Any]:
    """The renderer and the model, in float32, evaluation mode."""
    from transformers import MllamaForConditionalGeneration

    from omniserve.templates.render import PromptRenderer

    return PromptRenderer.from_pretrained(tiny_mllama), MllamaForConditionalGeneration.from_pretrained(tiny_mllama)


def _image(width: int, height: int, seed: int) -> Any:
    import numpy as np
    from PIL import Image

    from omniserve.media.loader import MediaItem

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return MediaItem("image", Image.fromarray(pixels))


def _sample(renderer: Any, images: list[Any], question: str, answer: str) -> Sample:
    from omniserve.templates.training import render_training_example

    content = [*({"type": "image"} for _ in images), {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    example = render_training_example(renderer, messages, images)
    return Sample(1, example.input_ids, example.labels, example.mm_inputs)


def _losses(model: Any, batch: dict[str, Any]) -> list[float]:
    """Each row's mean loss over its labelled tokens."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return [float(F.cross_entropy(logits[row, :-1], labels[row, 1:])) for row in range(labels.shape[0])]


def _alone_and_batched(model: Any, samples: list[Sample], pad_id: int) -> tuple[list[float], list[float]]:
    collate = PaddingCollator(pad_id)
    alone = [_losses(model, collate([sample]))[0] for sample in samples]
    return alone, _losses(model, collate(samples))


def test_mllama_samples_of_different_tiles_and_images_batch_as_they_train_alone(mllama: tuple[Any, Any]) -> None:
    """One tile beside two, one image beside two: each row sees only its own tiles.

    With the same number of images the losses are those alone to float precision. A row padded with an empty
    image slot differs by ~1e-4: its tokens before ``<|image|>`` see no tile, and transformers then lets them
    attend to every tile of the row, padding included; the processor's own batch of the two (compared here,
    tensor for tensor) does exactly the same.
    """
    renderer, model = mllama
    pad = renderer.tokenizer.pad_token_id
    square = _sample(renderer, [_image(64, 64, 0)], "what is it?", "a noisy square")
    wide = _sample(renderer, [_image(64, 30, 1)], "describe this picture in a few words", "wide and noisy")
    two = _sample(renderer, [_image(64, 30, 2), _image(30, 64, 3)], "compare them", "both are noisy")
    assert square.mm_inputs["aspect_ratio_mask"].sum() == 1 and wide.mm_inputs["aspect_ratio_mask"].sum() == 2

    alone, batched = _alone_and_batched(model, [square, wide], pad)
    assert batched == pytest.approx(alone, rel=1e-5)

    alone, batched = _alone_and_batched(model, [square, two], pad)
    assert batched[1] == pytest.approx(alone[1], rel=1e-5)  # the wider row: nothing padded in its images
    assert batched[0] == pytest.approx(alone[0], rel=1e-3)

    batch = PaddingCollator(pad)([square, two])
    texts = [renderer.tokenizer.decode(s.input_ids) for s in (square, two)]
    images = [[_image(64, 64, 0).data], [_image(64, 30, 2).data, _image(30, 64, 3).data]]
    reference = renderer.processor(text=texts, images=images, add_special_tokens=False, return_tensors="pt")
    assert reference["input_ids"][1].tolist() == two.input_ids
    for key in ("pixel_values", "aspect_ratio_ids"):
        assert batch[key].equal(reference[key]), key
    width = len(square)
    assert batch["cross_attention_mask"][0, :width].equal(reference["cross_attention_mask"][0, :width])
    assert batch["cross_attention_mask"][1].equal(reference["cross_attention_mask"][1])
    assert batch["aspect_ratio_mask"][0, 1].sum() == 0  # the padding image slot: no tile


def test_a_text_only_mllama_sample_beside_an_image_one_sees_no_tile(mllama: tuple[Any, Any]) -> None:
    """The image row trains as alone; the text row's mask is all zero (it sees no tile).

    transformers still lets that row attend to the batch's tiles (a token that sees no tile attends to all of
    them), so its loss is not its loss alone, which transformers' processor avoids by refusing such batches;
    Mllama's ``exclusive_media`` keeps the two kinds of samples in different batches (checked last).
    """
    from omniserve.models.families import get

    renderer, model = mllama
    pad = renderer.tokenizer.pad_token_id
    image = _sample(renderer, [_image(64, 30, 4)], "what is it?", "a noisy picture")
    text = _sample(renderer, [], "and now something without any images at all", "fine")
    batch = PaddingCollator(pad)([image, text])
    assert batch["cross_attention_mask"].shape[:2] == (2, max(len(image), len(text)))
    assert batch["cross_attention_mask"][1].sum() == 0 and batch["pixel_values"][1].abs().sum() == 0
    assert batch["aspect_ratio_ids"][1].sum() == 0
    alone, batched = _alone_and_batched(model, [image, text], pad)
    assert batched[0] == pytest.approx(alone[0], rel=1e-5)
    assert batched[1] != pytest.approx(alone[1], rel=1e-5)  # once equal, Mllama's exclusive_media can go
    family = get("mllama")
    assert plan_batches([IMAGE, TEXT], 2, family.exclusive_media) == [[0], [1]]


# --------------------------------------------------------------------------- GLM-4.1V: images or videos


@pytest.fixture(scope="module")
def tiny_glm4v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from omniserve.models.families import get

    return get("glm4v").build(tmp_path_factory.mktemp("glm4v") / "tiny-glm4v", published_template("glm4v"))


def _conversation(*parts: dict[str, Any], answer: str = "ok") -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [*parts, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": answer},
    ]


def test_glm4v_trains_two_a_batch_on_images_and_videos_never_together(tiny_glm4v: Path, tmp_path: Path) -> None:
    import math

    from omniserve.train.options import TrainOptions
    from omniserve.train.sft import run_training

    write_media(tmp_path)
    image, video = image_part("media/red.png"), video_part("media/clip.mp4")
    data = write_jsonl(
        tmp_path / "data.jsonl",
        [_conversation(image, answer="red"), _conversation(video, answer="right")] * 2,
    )
    options = TrainOptions(
        model=tiny_glm4v, data=data, output=tmp_path / "out", max_steps=2, batch_size=2, progress=False
    )
    result = run_training(options)
    assert result.global_step == 2 and all(math.isfinite(loss) for loss in result.losses)


def test_a_training_sample_holding_an_image_and_a_video_is_refused_naming_it(tiny_glm4v: Path, tmp_path: Path) -> None:
    from omniserve.train.data import DataError
    from omniserve.train.options import TrainOptions
    from omniserve.train.sft import run_training

    write_media(tmp_path)
    image, video = image_part("media/red.png"), video_part("media/clip.mp4")
    data = write_jsonl(tmp_path / "data.jsonl", [_conversation(image), _conversation(image, video)])
    with pytest.raises(DataError, match=r"data\.jsonl:2: sample 1 holds image and video input.*GLM-4\.1V"):
        run_training(TrainOptions(model=tiny_glm4v, data=data, output=tmp_path / "out", progress=False))
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.fixture(scope="module")
def glm4v_server(tiny_glm4v: Path) -> Iterator[RunningServer]:
    server = start_server(tiny_glm4v, name="tiny-glm4v", engine={"max_model_len": 1024})
    yield server
    server.stop()


def test_the_gateway_refuses_an_image_with_a_video_naming_model_and_limitation(glm4v_server: RunningServer) -> None:
    image = {"type": "image_url", "image_url": {"url": data_url("image/png", png_bytes(64, 64))}}
    video = {"type": "video_url", "video_url": {"url": data_url("video/mp4", video_bytes("mp4", seconds=1, fps=4))}}
    client = glm4v_server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=glm4v_server.model_name,
            messages=[{"role": "user", "content": [image, video, {"type": "text", "text": "Same thing?"}]}],
            max_tokens=2,
        )
    body = caught.value.body
    assert "tiny-glm4v" in body["message"] and "does not accept image and video input in one request" in body["message"]
    assert "GLM-4.1V takes only one of them" in body["message"]
    assert body["param"] == "messages[0].content[1]"
    alone = client.chat.completions.create(
        model=glm4v_server.model_name, messages=[{"role": "user", "content": [video]}], max_tokens=2
    )
    assert alone.choices[0].finish_reason in ("stop", "length")
