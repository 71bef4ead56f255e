"""POST /v1/chat/completions: OpenAI messages (text, image, video, audio parts) through the template layer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from omniserve.engines.base import GenerationRequest, TokenLogprobs
from omniserve.errors import InvalidRequest
from omniserve.media.loader import MediaOptions, loaded_media
from omniserve.protocol import (
    AssistantOut,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    DeltaMessage,
    MultiModalOptions,
    TokenLogprob,
    TopLogprob,
    Usage,
    dump,
    new_id,
    now,
)
from omniserve.server.serving_base import OpenAIServing, Submitted
from omniserve.templates.conversation import to_hf_messages
from omniserve.templates.render import RenderOptions


def chat_logprobs(items: list[TokenLogprobs] | None) -> ChoiceLogprobs | None:
    if items is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=t.token,
                logprob=t.logprob,
                bytes=list(t.token.encode("utf-8")),
                top_logprobs=[TopLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8"))) for _, s, lp in t.top],
            )
            for t in items
        ]
    )


class ChatServing(OpenAIServing[ChatCompletionRequest]):
    request_model = ChatCompletionRequest
    endpoint = "chat"

    async def prepare(self, request: ChatCompletionRequest) -> list[GenerationRequest]:
        renderer = self.ctx.renderer
        messages, sources = to_hf_messages(request.messages)
        for source in sources:  # refuse before fetching anything the model cannot use
            if source.kind not in renderer.modalities:
                raise InvalidRequest(f"this model does not accept {source.kind} input", param=source.param)
        opts = request.mm_processor_kwargs or MultiModalOptions()
        limits = self.ctx.server.media
        media_options = MediaOptions(fps=opts.fps, max_frames=opts.max_frames).check(limits)
        render_options = RenderOptions(max_pixels=opts.max_pixels, min_pixels=opts.min_pixels)
        # the decoded media count against the app's bound until the prompt holds the model's inputs
        async with loaded_media(sources, limits, media_options, self.ctx.media_gate) as media:
            prompt = await self.ctx.rendering.chat(messages, media, options=render_options)  # threads of its own
        max_tokens = renderer.check_length(prompt, request.requested_max_tokens)
        sampling = request.to_sampling_params(max_tokens=max_tokens)
        return [GenerationRequest(request_id=new_id("chatcmpl"), prompt=prompt, sampling=sampling)]

    async def chunks(self, request: ChatCompletionRequest, submitted: Submitted) -> AsyncIterator[dict[str, Any]]:
        request_id, created, model = submitted.jobs[0].request_id, now(), self.ctx.model_name

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> dict[str, Any]:
            return dump(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage))

        for i in range(request.n):
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        async for _, delta in submitted.deltas():
            if not delta.text and delta.finish_reason is None and not delta.logprobs:
                continue  # text held back (possible stop string, partial character)
            yield chunk(
                [
                    ChatChunkChoice(
                        index=delta.index,
                        delta=DeltaMessage(content=delta.text if delta.text or delta.finish_reason is None else None),
                        logprobs=chat_logprobs(delta.logprobs),
                        finish_reason=delta.finish_reason,
                    )
                ]
            )
        if request.stream_options is not None and request.stream_options.include_usage:
            yield chunk([], usage=submitted.usage())

    async def collect(self, request: ChatCompletionRequest, submitted: Submitted) -> dict[str, Any]:
        texts = [""] * request.n
        logprobs: list[list[TokenLogprobs] | None] = [[] if request.logprobs else None for _ in range(request.n)]
        finish: list[str | None] = [None] * request.n
        async for _, delta in submitted.deltas():
            texts[delta.index] += delta.text
            if delta.logprobs is not None and logprobs[delta.index] is not None:
                logprobs[delta.index].extend(delta.logprobs)  # type: ignore[union-attr]
            if delta.finish_reason:
                finish[delta.index] = delta.finish_reason
        choices = [
            ChatChoice(
                index=i,
                message=AssistantOut(content=texts[i]),
                logprobs=chat_logprobs(logprobs[i]),
                finish_reason=finish[i],
            )
            for i in range(request.n)
        ]
        return dump(
            ChatCompletion(
                id=submitted.jobs[0].request_id,
                model=self.ctx.model_name,
                choices=choices,
                usage=submitted.usage(),
            )
        )
