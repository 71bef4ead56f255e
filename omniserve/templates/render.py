"""``render(messages, media) -> token ids + media payload``: the one place a prompt is made.

Every engine and (later) training call this, so a served prompt is token-for-token the prompt a
model was trained on. The checkpoint's own chat template (``apply_chat_template``) writes the
text and its own processor expands media placeholders and prepares pixel/audio features; no
per-model prompt format is written here.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniserve.errors import ContextLengthExceeded, InvalidRequest, MediaError, ModelLoadError
from omniserve.media.audio import DecodedAudio
from omniserve.media.loader import MediaItem
from omniserve.media.video import DecodedVideo
from omniserve.templates.content_format import roles_printing_content, with_string_content
from omniserve.templates.conversation import HFMessage

_TOKEN_KEYS = ("input_ids", "attention_mask")


#: What the server itself gives a chat template (or transformers does): never a request's to set.
_TEMPLATE_OWN_VARIABLES = frozenset(
    {
        "messages",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "raise_exception",
        "strftime_now",
        "namespace",
        "range",
        "dict",
        "loop",
    }
)


@dataclass(frozen=True)
class RenderOptions:
    """Per-request processor settings (already validated against the server's caps)."""

    max_pixels: int | None = None
    min_pixels: int | None = None
    #: OpenAI function tools (``{"type": "function", "function": {...}}``), given to the template as ``tools``.
    tools: tuple[dict[str, Any], ...] = ()
    #: Extra template variables (``chat_template_kwargs``), already checked by ``check_template_kwargs``.
    template_kwargs: tuple[tuple[str, Any], ...] = ()


@dataclass
class RenderedPrompt:
    """What an engine needs to run one prompt, identical for every engine.

    ``mm_inputs`` holds the processor's tensors (pixel values, grids, audio features) for engines
    that take processed media (transformers); ``media`` keeps the decoded items in prompt order and
    ``processor_kwargs`` the per-modality options they were processed with, for engines that re-run
    the processor themselves (vLLM) and must reproduce ``token_ids`` exactly.
    """

    token_ids: list[int]
    mm_inputs: dict[str, Any] = field(default_factory=dict)
    media: list[MediaItem] = field(default_factory=list)
    text: str | None = None
    processor_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def _modalities(processor: Any) -> frozenset[str]:
    found = {"text"}
    if getattr(processor, "image_processor", None) is not None:
        found.add("image")
    if getattr(processor, "video_processor", None) is not None:
        found.add("video")
    if _audio_processor(processor) is not None:
        found.add("audio")
    return frozenset(found)


def _audio_processor(processor: Any) -> Any:
    """The audio feature extractor: ``feature_extractor`` (Whisper-style processors), or ``audio_processor`` (Phi-4)."""
    found = getattr(processor, "feature_extractor", None)
    return found if found is not None else getattr(processor, "audio_processor", None)


def _pixel_bounds(size: Any) -> dict[str, int] | None:
    """``{"shortest_edge", "longest_edge"}`` pixel bounds from a processor's saved size, if it has them."""
    if size is None:
        return None
    get = size.get if isinstance(size, dict) else (lambda key, default=None: getattr(size, key, default))
    longest = get("longest_edge", None)
    if longest is None:
        return None
    return {"shortest_edge": int(get("shortest_edge", 0) or 0), "longest_edge": int(longest)}


def _generation_eos_ids(folder: Path) -> tuple[int, ...]:
    """The eos ids a checkpoint's ``generation_config.json`` lists (chat models often add their end-of-turn token)."""
    try:
        eos = json.loads((folder / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()
    values = eos if isinstance(eos, list) else [eos]
    return tuple(v for v in values if isinstance(v, int))


def _family_media_placeholders(folder: Path) -> dict[str, str]:
    """``Family.media_placeholders`` of the checkpoint in ``folder`` (none: no family, or one refused at load)."""
    from omniserve.models.families import check_supported

    try:
        family = check_supported(folder)
    except ModelLoadError:
        return {}  # an unknown or refused architecture is refused where the model loads, with its own message
    return dict(family.media_placeholders) if family is not None else {}


def _flatten_text(messages: list[HFMessage]) -> list[HFMessage]:
    """Text-only models' templates often expect string content; give them strings."""
    flat = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content)
        flat.append({**m, "content": content})  # tool_calls and tool_call_id go through as they are
    return flat


class PromptRenderer:
    """Owns a checkpoint's processor and chat template; turns conversations into model inputs."""

    def __init__(
        self,
        processor: Any,
        *,
        max_model_len: int | None = None,
        stop_token_ids: Iterable[int] = (),
        media_placeholders: Mapping[str, str] | None = None,
    ) -> None:
        """``media_placeholders``: the family's media as text, for templates that take only strings
        (``Family.media_placeholders``; ``from_pretrained`` finds them from the checkpoint's family)."""
        self.processor = processor
        self.media_placeholders = dict(media_placeholders or {})
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.modalities = _modalities(processor)
        self.max_model_len = max_model_len
        self._stop_token_ids = frozenset(stop_token_ids)
        # HF fast tokenizers are not safe to call from several threads at once ("Already borrowed")
        self._lock = threading.Lock()
        self._template_owner = processor if getattr(processor, "chat_template", None) else self.tokenizer
        self._renders_tools: bool | None = None  # found out on the first request with tools
        self._template_variables: frozenset[str] | None = None
        self._string_roles: frozenset[str] | None = None  # found on first use (``string_content_roles``)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, max_model_len: int | None = None) -> PromptRenderer:
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load the processor/tokenizer of {path}: {exc}") from exc
        return cls(
            processor,
            max_model_len=max_model_len,
            stop_token_ids=_generation_eos_ids(Path(path)),
            media_placeholders=_family_media_placeholders(Path(path)),
        )

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._template_owner, "chat_template", None))

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template prompts are rendered with (the processor's, else the tokenizer's)."""
        return getattr(self._template_owner, "chat_template", None)

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end a generation: the tokenizer's eos and the checkpoint's ``generation_config.json`` eos ids.

        Training needs them to tell where an assistant turn ends when the template does not mark it:
        the turn is what the model generates, up to and including the token that stops it.
        """
        eos = self.tokenizer.eos_token_id
        return self._stop_token_ids | ({eos} if isinstance(eos, int) else set())

    # ------------------------------------------------------------------ chat

    def render_chat(
        self,
        messages: list[HFMessage],
        media: list[MediaItem],
        *,
        add_generation_prompt: bool = True,
        options: RenderOptions | None = None,
    ) -> RenderedPrompt:
        self._check_modalities(media)
        if not self.has_chat_template:
            raise InvalidRequest(
                "this model has no chat template; use /v1/completions with a raw prompt", param="messages"
            )
        conversation = self.template_conversation(messages)
        tools = list(options.tools) if options is not None and options.tools else None
        extra = dict(options.template_kwargs) if options is not None else {}
        with self._lock:
            text = self._apply_template(conversation, add_generation_prompt, tools=tools, extra=extra)
            if not media:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                return RenderedPrompt(token_ids=list(ids), text=text)
            kwargs = self._media_kwargs(media, options or RenderOptions())
            try:
                inputs = self.processor(text=[text], return_tensors="pt", **kwargs)
            except (ValueError, RuntimeError, TypeError, IndexError) as exc:
                # e.g. an image whose aspect ratio the vision processor cannot tile
                raise MediaError(f"the model's processor cannot use this media: {exc}", param="messages") from exc
        token_ids = inputs["input_ids"][0].tolist()
        mm_inputs = {k: v for k, v in inputs.items() if k not in _TOKEN_KEYS}
        self._fix_video_timing(mm_inputs, media)
        processor_kwargs = {k: v for k, v in kwargs.items() if k.endswith("_kwargs")}
        return RenderedPrompt(
            token_ids=token_ids, mm_inputs=mm_inputs, media=list(media), text=text, processor_kwargs=processor_kwargs
        )

    def template_token_ids(
        self, messages: list[HFMessage], *, add_generation_prompt: bool, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The tokenizer's reading of the template's text for ``messages``, media placeholders not expanded.

        The text half of ``render_chat`` (same conversation, same template call, same tokenizer call)
        without touching media, so training can render every prefix of a conversation cheaply and
        find each assistant turn's tokens by difference; ``templates/training.py`` then carries the
        resulting mask onto the processor's media-expanded ids. ``tools``: as ``RenderOptions.tools``.
        """
        if not self.has_chat_template:
            raise InvalidRequest("this model has no chat template", param="messages")
        conversation = self.template_conversation(messages)
        with self._lock:
            text = self._apply_template(conversation, add_generation_prompt, tools=tools or None)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def template_conversation(self, messages: list[HFMessage]) -> list[HFMessage]:
        """The conversation exactly as the chat template receives it.

        String content for text-only models; for multimodal ones, parts, except the turns of roles whose content
        the template prints as-is (``content_format``: GLM-4.1V's system and assistant turns, every turn of
        Phi-4-multimodal's template), which get a string: their text, and their media as the family's placeholders.
        """
        if self.modalities == {"text"}:
            return _flatten_text(messages)
        return with_string_content(messages, self.string_content_roles(), self.media_placeholders)

    def string_content_roles(self) -> frozenset[str]:
        """The roles whose text-only content the chat template gets as a string (found once, by rendering)."""
        if self._string_roles is None:
            if not self.has_chat_template:
                self._string_roles = frozenset()
            else:
                with self._lock:
                    self._string_roles = roles_printing_content(lambda probe: self._apply_template(probe, True))
        return self._string_roles

    def assistant_text_mask(
        self, messages: list[HFMessage], *, tools: list[dict[str, Any]] | None = None
    ) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation *before* media expansion, and a mask of the assistant tokens.

        For training labels (``templates/training.py``): the mask marks what the template wraps in
        ``{% generation %}``, i.e. what the model must learn to produce. The ids are the tokenizer's
        reading of the same text ``render_chat(add_generation_prompt=False)`` makes; the caller checks
        that and maps the mask onto the processor's media-expanded ids.
        """
        conversation = self.template_conversation(messages)
        with self._lock:
            out = self.tokenizer.apply_chat_template(
                conversation,
                tools=tools or None,
                chat_template=self.chat_template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
                add_generation_prompt=False,
            )
        return list(out["input_ids"]), list(out["assistant_masks"])

    def renders_tools(self) -> bool:
        """Whether the chat template writes ``tools`` into the prompt: a one-message probe with and without one.

        A template that ignores them would have the model answer without knowing the tools, and the
        client would never learn why; the gateway refuses tools for such a model instead.
        """
        if self._renders_tools is None:
            probe = self.template_conversation([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
            tool = {"type": "function", "function": {"name": "probe", "parameters": {"type": "object"}}}
            try:
                with self._lock:
                    plain = self._apply_template(probe, True)
                    with_tools = self._apply_template(probe, True, tools=[tool])
            except InvalidRequest:  # a template that cannot render a lone user turn: no tools either
                self._renders_tools = False
            else:
                self._renders_tools = with_tools != plain
        return self._renders_tools

    def template_variables(self) -> frozenset[str]:
        """The variables the chat template reads that a request may set (``chat_template_kwargs``)."""
        if self._template_variables is None:
            from jinja2 import Environment, meta

            template = self.chat_template or ""
            found = meta.find_undeclared_variables(Environment().parse(template)) if template else set()
            self._template_variables = frozenset(found) - _TEMPLATE_OWN_VARIABLES
        return self._template_variables

    def check_template_kwargs(self, kwargs: dict[str, Any], *, param: str = "chat_template_kwargs") -> None:
        """A 400 naming a key the template does not read, or one the server sets itself."""
        for key in kwargs:
            if key in _TEMPLATE_OWN_VARIABLES:
                raise InvalidRequest(f"{param}.{key} is set by the server and cannot be given", param=f"{param}.{key}")
            if key not in self.template_variables():
                known = ", ".join(sorted(self.template_variables())) or "none"
                raise InvalidRequest(
                    f"this model's chat template does not use {key!r} (variables it reads: {known})",
                    param=f"{param}.{key}",
                )

    def _apply_template(
        self,
        conversation: list[HFMessage],
        add_generation_prompt: bool,
        *,
        tools: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        from jinja2 import TemplateError

        try:
            return self._template_owner.apply_chat_template(
                conversation, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **(extra or {})
            )
        except TemplateError as exc:
            # the checkpoint's own template refuses this conversation (e.g. roles out of order)
            raise InvalidRequest(
                f"the model's chat template rejected the conversation: {exc}", param="messages"
            ) from exc

    def _check_modalities(self, media: list[MediaItem]) -> None:
        for item in media:
            if item.kind not in self.modalities:
                raise InvalidRequest(f"this model does not accept {item.kind} input", param="messages")

    def _media_kwargs(self, media: list[MediaItem], options: RenderOptions) -> dict[str, Any]:
        images = [m.data for m in media if m.kind == "image"]
        videos = [m.data for m in media if m.kind == "video"]
        audios = [m.data for m in media if m.kind == "audio"]
        kwargs: dict[str, Any] = {}
        if images:
            kwargs["images"] = images
            size = self._size_override(self.processor.image_processor, options)
            if size:
                kwargs["images_kwargs"] = {"size": size}
        if videos:
            kwargs["videos"] = [v.frames for v in videos if isinstance(v, DecodedVideo)]
            kwargs["videos_kwargs"] = self._video_kwargs(videos, options)
        if audios:
            rate = getattr(_audio_processor(self.processor), "sampling_rate", 16000)
            kwargs["audio"] = [a.samples for a in audios if isinstance(a, DecodedAudio)]
            kwargs["audio_kwargs"] = {"sampling_rate": rate}
        return kwargs

    @staticmethod
    def _size_override(sub_processor: Any, options: RenderOptions) -> dict[str, int] | None:
        """The saved pixel budget, optionally lowered per request (never raised above the saved one)."""
        saved = _pixel_bounds(getattr(sub_processor, "size", None))
        if saved is None:
            return None
        size = dict(saved)
        if options.max_pixels is not None:
            if options.max_pixels > saved["longest_edge"]:
                raise InvalidRequest(
                    f"max_pixels {options.max_pixels} exceeds this model's budget of {saved['longest_edge']} pixels",
                    param="mm_processor_kwargs.max_pixels",
                )
            size["longest_edge"] = options.max_pixels
        if options.min_pixels is not None:
            size["shortest_edge"] = options.min_pixels
        if size["shortest_edge"] > size["longest_edge"]:
            raise InvalidRequest("min_pixels must not exceed max_pixels", param="mm_processor_kwargs.min_pixels")
        return size

    def _video_kwargs(self, videos: list[Any], options: RenderOptions) -> dict[str, Any]:
        # Frames are already sampled by the media layer; the processor must not resample them, and
        # some processors carry class-level size defaults that override the saved ones unless given.
        kwargs: dict[str, Any] = {"do_sample_frames": False, "fps": videos[0].fps}
        # each video's own frame times, for processors that write them into the prompt (Qwen3-VL): without
        # them such a processor assumes 24 fps, and the served prompt would not be the one vLLM builds
        kwargs["video_metadata"] = [v.metadata() for v in videos]
        size = self._size_override(self.processor.video_processor, options)
        if size:
            kwargs["size"] = size
        return kwargs

    def _fix_video_timing(self, mm_inputs: dict[str, Any], media: list[MediaItem]) -> None:
        """Processors take one fps per call; give each video its own seconds-per-grid for positions."""
        if "video_second_per_grid" not in mm_inputs:
            return
        import torch

        temporal = getattr(self.processor.video_processor, "temporal_patch_size", 2)
        fps = [m.data.fps for m in media if m.kind == "video" and isinstance(m.data, DecodedVideo)]
        mm_inputs["video_second_per_grid"] = torch.tensor([temporal / f for f in fps], dtype=torch.float32)

    # ------------------------------------------------------------------ raw prompts

    def render_text(self, prompt: str | list[int]) -> RenderedPrompt:
        """Legacy completions: the prompt as given, no chat template."""
        if isinstance(prompt, str):
            with self._lock:
                ids = self.tokenizer(prompt)["input_ids"]
            return RenderedPrompt(token_ids=list(ids), text=prompt)
        vocab = self.vocab_size
        bad = [t for t in prompt if t < 0 or t >= vocab]
        if bad:
            raise InvalidRequest(f"prompt token id {bad[0]} is outside the vocabulary (size {vocab})", param="prompt")
        return RenderedPrompt(token_ids=list(prompt))

    # ------------------------------------------------------------------ limits

    @property
    def vocab_size(self) -> int:
        """The tokenizer's length, added tokens included: the ids a request may name.

        The model's embedding may be padded past it, but no id beyond the tokenizer means anything.
        """
        return len(self.tokenizer)

    def check_token_ids(self, ids: Iterable[int], *, param: str) -> None:
        """Refuse ids outside the vocabulary (``stop_token_ids``): the sampler would index its logits with them.

        With ``min_tokens`` such an id reached the transformers engine's sampler, which raised
        ``IndexError``: a 500, after which uvicorn closed the client's keep-alive connection.
        """
        vocab = self.vocab_size
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} in {param} is outside the vocabulary (size {vocab})", param=param)

    def check_length(self, prompt: RenderedPrompt, max_tokens: int | None, *, param: str = "messages") -> int:
        """Return the completion budget; refuse prompts that leave no room in the context window.

        A prompt of no tokens (``""`` for a tokenizer that adds no BOS) is refused too: a model needs a
        token to continue from, and the multimodal-rope code of some models fails on an empty input.
        """
        if prompt.num_tokens == 0:
            raise InvalidRequest("the prompt is empty: it renders to no tokens to continue from", param=param)
        if self.max_model_len is None:
            return max_tokens or 256
        room = self.max_model_len - prompt.num_tokens
        if room <= 0:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{prompt.num_tokens} tokens",
                param=param,
            )
        if max_tokens is not None and max_tokens > room:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_model_len} tokens; you requested "
                f"{prompt.num_tokens + max_tokens} tokens ({prompt.num_tokens} in the prompt, {max_tokens} for "
                "the completion)",
                param="max_tokens",
            )
        return max_tokens if max_tokens is not None else room
