"""POST /v1/completions: legacy completions on a raw prompt (no chat template)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from omniserve.engines.base import GenerationRequest, TokenLogprobs
from omniserve.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    dump,
    new_id,
    now,
)
from omniserve.server.serving_base import OpenAIServing, Submitted


def completion_logprobs(items: list[TokenLogprobs] | None, offset: int) -> CompletionLogprobs | None:
    if items is None:
        return None
    result = CompletionLogprobs()
    for t in items:
        result.tokens.append(t.token)
        result.token_logprobs.append(t.logprob)
        result.top_logprobs.append({s: lp for _, s, lp in t.top})
        result.text_offset.append(offset)
        offset += len(t.token)
    return result


class CompletionServing(OpenAIServing[CompletionRequest]):
    request_model = CompletionRequest
    endpoint = "completions"

    async def prepare(self, request: CompletionRequest) -> list[GenerationRequest]:
        renderer = self.ctx.renderer
        renderer.check_token_ids(request.stop_token_ids or (), param="stop_token_ids")
        request_id = new_id("cmpl")
        structured = request.structured_output()
        if structured is not None:  # the extra body's guided_* / structured_outputs, checked before any work
            from omniserve.structured.check import check

            await asyncio.to_thread(check, structured)
        jobs = []
        prompts = request.prompts()
        for i, raw in enumerate(prompts):
            prompt = await self.ctx.rendering.text(raw)  # threads media work cannot take
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            max_tokens = renderer.check_length(prompt, request.max_tokens, param=param)
            sampling = request.to_sampling_params(max_tokens=max_tokens, structured=structured)
            jobs.append(GenerationRequest(request_id=f"{request_id}-{i}", prompt=prompt, sampling=sampling))
        return jobs

    async def chunks(self, request: CompletionRequest, submitted: Submitted) -> AsyncIterator[dict[str, Any]]:
        request_id, created, model = submitted.jobs[0].request_id.rsplit("-", 1)[0], now(), request.model
        offsets: dict[int, int] = {}
        async for job_index, delta in submitted.deltas():
            if not delta.text and delta.finish_reason is None and not delta.logprobs:
                continue
            index = job_index * request.n + delta.index
            logprobs = completion_logprobs(delta.logprobs, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(delta.text)
            choice = CompletionChoice(
                index=index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason
            )
            yield dump(Completion(id=request_id, created=created, model=model, choices=[choice]))
        if request.stream_options is not None and request.stream_options.include_usage:
            yield dump(Completion(id=request_id, created=created, model=model, choices=[], usage=submitted.usage()))

    async def collect(self, request: CompletionRequest, submitted: Submitted) -> dict[str, Any]:
        total = len(submitted.jobs) * request.n
        texts = [""] * total
        logprobs: list[list[TokenLogprobs]] = [[] for _ in range(total)]
        finish: list[str | None] = [None] * total
        async for job_index, delta in submitted.deltas():
            index = job_index * request.n + delta.index
            texts[index] += delta.text
            logprobs[index].extend(delta.logprobs or [])
            finish[index] = delta.finish_reason or finish[index]
        choices = [
            CompletionChoice(
                index=i,
                text=texts[i],
                logprobs=completion_logprobs(logprobs[i], 0) if request.logprobs is not None else None,
                finish_reason=finish[i],
            )
            for i in range(total)
        ]
        request_id = submitted.jobs[0].request_id.rsplit("-", 1)[0]
        return dump(Completion(id=request_id, model=request.model, choices=choices, usage=submitted.usage()))
