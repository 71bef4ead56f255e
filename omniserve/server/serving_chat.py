"""POST /v1/chat/completions: OpenAI messages (text, image, video, audio parts) through the template layer."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omniserve.engines.base import GenerationRequest, TokenLogprobs
from omniserve.errors import InvalidRequest, ModelLoadError, UnsupportedParameter
from omniserve.media.loader import MediaOptions, loaded_media
from omniserve.protocol import (
    AssistantMessage,
    AssistantOut,
    ChatAudioOut,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    MultiModalOptions,
    NamedToolChoice,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
    Usage,
    dump,
    new_id,
    now,
)
from omniserve.reasoning import Piece, ReasoningSplitter, prompt_opens_block, split, template_thinks
from omniserve.server.serving_base import OpenAIServing, ServingContext, Submitted
from omniserve.server.serving_speech import cannot_speak
from omniserve.speech.chat_audio import SpokenStream, b64, spoken_chunks, wire_format
from omniserve.speech.encode import encode
from omniserve.speech.synthesizer import SpeechSynthesizer
from omniserve.structured.spec import StructuredOutput, length_bounds_as_patterns
from omniserve.templates.conversation import to_hf_messages
from omniserve.templates.render import RenderOptions
from omniserve.tools.base import ArgumentsPiece, Event, ParsedCall, TextPiece, ToolCallParser
from omniserve.tools.registry import require_parser

if TYPE_CHECKING:
    from omniserve.models.families import Family


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


def tool_call_id(parser: ToolCallParser | type[ToolCallParser] | None = None) -> str:
    """A new call's id, which clients send back with the tool's result: OpenAI's shape (``call_`` and 24
    characters) unless the parser's format wants another (Mistral's templates take only 9 alphanumerics)."""
    return (parser or ToolCallParser).call_id()


def tool_finish(finish_reason: str | None, calls: int) -> str | None:
    """A reply that ended by itself after writing calls finished to have them run, as OpenAI says it."""
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


def message_of(text: str, parser: ToolCallParser | None) -> tuple[AssistantOut, int]:
    """A whole reply as the assistant message, calls found by ``parser``; and how many calls it holds."""
    if parser is None:
        return AssistantOut(content=text), 0
    events = parser.parse_all(text)
    content = "".join(e.text for e in events if isinstance(e, TextPiece))
    calls = [
        ToolCallOut(id=tool_call_id(parser), function=FunctionCallOut(name=e.name, arguments=e.arguments))
        for e in events
        if isinstance(e, ParsedCall)
    ]
    return AssistantOut(content=content or None, tool_calls=calls or None), len(calls)


def stream_deltas(events: list[Event], first_index: int, parser: ToolCallParser | None = None) -> list[DeltaMessage]:
    """Parser events as OpenAI deltas: text as content; a call as its id and name, then its arguments (whole, or
    in the fragments an incremental parser gives as the model writes them).

    ``first_index`` is the number of calls this choice closed before: each call has its own index.
    """
    deltas: list[DeltaMessage] = []
    index = first_index
    for event in events:
        if isinstance(event, TextPiece):
            if deltas and deltas[-1].tool_calls is None and deltas[-1].content is not None:
                deltas[-1].content += event.text
            else:
                deltas.append(DeltaMessage(content=event.text))
            continue
        if isinstance(event, ArgumentsPiece):
            deltas.append(
                DeltaMessage(tool_calls=[DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=event.text))])
            )
            continue
        if isinstance(event, ParsedCall) and event.opened:  # its name and arguments were streamed already
            index += 1
            continue
        head = DeltaToolCall(
            index=index,
            id=tool_call_id(parser),
            type="function",
            function=DeltaFunctionCall(name=event.name, arguments=""),
        )
        deltas.append(DeltaMessage(tool_calls=[head]))
        if isinstance(event, ParsedCall):
            deltas.append(
                DeltaMessage(
                    tool_calls=[DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=event.arguments))]
                )
            )
            index += 1
    return deltas


def new_parser(parser_class: type[ToolCallParser] | None, submitted: Submitted) -> ToolCallParser | None:
    """One choice's parser: incremental where the call grammar is enforced (a call is certain once opened, so it
    streams as written), for the stream and the whole reply alike: both carry the arguments the model wrote."""
    if parser_class is None:
        return None
    parser, structured = parser_class(), submitted.jobs[0].sampling.structured
    parser.incremental = structured is not None and structured.param == "tools"
    return parser


def _check_exclusive_media(ctx: ServingContext, sources: list[Any]) -> None:
    """A 400 for a request holding two inputs the model takes only one of in a pass (``Family.exclusive_media``)."""
    family = _family(ctx.engine_config.model)
    if family is None or not family.exclusive_media:
        return
    seen: dict[str, str] = {}  # exclusive kind -> the first part holding it
    for source in sources:
        if source.kind in family.exclusive_media:
            seen.setdefault(source.kind, source.param)
    if len(seen) > 1:
        first, second = seen
        raise InvalidRequest(
            f"model {ctx.model_name!r} does not accept {first} and {second} input in one request: {family.title} "
            f"takes only one of them in a forward pass ({seen[second]})",
            param=seen[second],
        )


@functools.lru_cache(maxsize=4)
def _family(model: Path) -> Family | None:
    """The served checkpoint's family (None: none, or a folder the loader has already judged)."""
    from omniserve.models.families import check_supported

    try:
        return check_supported(Path(model))
    except ModelLoadError:
        return None


class ChatServing(OpenAIServing[ChatCompletionRequest]):
    request_model = ChatCompletionRequest
    endpoint = "chat"

    def __init__(self, ctx: ServingContext, speech: SpeechSynthesizer | None = None) -> None:
        super().__init__(ctx)
        self.speech = speech  # the talker beside the engine, when the checkpoint speaks (audio output)

    async def prepare(self, request: ChatCompletionRequest) -> list[GenerationRequest]:
        renderer = self.ctx.renderer
        renderer.check_token_ids(request.stop_token_ids or (), param="stop_token_ids")  # before fetching media
        if request.speaks:
            self._speaker(request)  # a model that cannot speak, or an unknown voice: 400 before any work
        messages, sources = to_hf_messages(self._with_transcripts(request.messages))
        for source in sources:  # refuse before fetching anything the model cannot use
            if source.kind not in renderer.modalities:
                raise InvalidRequest(
                    f"model {self.ctx.model_name!r} does not accept {source.kind} input ({source.param})",
                    param=source.param,
                )
        _check_exclusive_media(self.ctx, sources)
        opts = request.mm_processor_kwargs or MultiModalOptions()
        limits = self.ctx.server.media
        media_options = MediaOptions(fps=opts.fps, max_frames=opts.max_frames).check(limits)
        parser = self._parser_class(request, check_template=True)  # no tools for this model: 400 before any work
        tools = tuple(t.model_dump(exclude_none=True) for t in request.tools or ()) if request.tools_enabled else ()
        template_kwargs = request.chat_template_kwargs or {}
        renderer.check_template_kwargs(template_kwargs)  # a 400 before any media is fetched
        render_options = RenderOptions(
            max_pixels=opts.max_pixels,
            min_pixels=opts.min_pixels,
            tools=tools,
            template_kwargs=tuple(template_kwargs.items()),
        )
        # the decoded media count against the app's bound until the prompt holds the model's inputs
        async with loaded_media(sources, limits, media_options, self.ctx.media_gate) as media:
            prompt = await self.ctx.rendering.chat(messages, media, options=render_options)  # threads of its own
        max_tokens = renderer.check_length(prompt, request.requested_max_tokens)
        sampling = request.to_sampling_params(max_tokens=max_tokens, structured=await self._constraint(request))
        if parser is not None:  # the call format's markers stay in the text even where they are control tokens
            sampling = dataclasses.replace(sampling, keep_special=parser.SPECIAL_TOKENS)
        return [GenerationRequest(request_id=new_id("chatcmpl"), prompt=prompt, sampling=sampling)]

    async def _constraint(self, request: ChatCompletionRequest) -> StructuredOutput | None:
        """What the reply must match: the parser's call grammar when ``tool_choice`` forces calls (or a tool is
        ``strict``), else the request's ``response_format`` / extra-body constraint; checked (a 400) here."""
        spec = self._call_constraint(request) or request.structured_output()
        if spec is not None:
            from omniserve.structured.check import check

            await asyncio.to_thread(check, spec)  # the first call imports the grammar library: off the loop
        return spec

    def _call_constraint(self, request: ChatCompletionRequest) -> StructuredOutput | None:
        choice, tools = request.tool_choice, request.tools or []
        strict = request.tools_enabled and any(t.function.strict for t in tools)
        if not request.forces_tool_call and not (strict and request.structured_output() is None):
            return None
        parser = self._parser_class(request)
        if parser is None:  # tools_enabled is true here: the parser exists or _parser_class refused
            return None
        if isinstance(choice, NamedToolChoice):
            mode, tools = "named", [t for t in tools if t.function.name == choice.function.name]
        else:
            mode = "required" if choice == "required" else "auto"
        functions = [
            (t.function.name, length_bounds_as_patterns(t.function.parameters or {"type": "object", "properties": {}}))
            for t in tools
        ]
        tag = parser.call_format(functions, mode=mode, parallel=request.parallel_tool_calls is not False)
        if tag is None:
            raise UnsupportedParameter(
                f"the {parser.NAME} tool-call format has no grammar: tool_choice {choice!r} and strict tools cannot "
                "be enforced with it",
                param="tool_choice",
            )
        return StructuredOutput.structural_tag(tag, "tools")

    def _parser_class(
        self, request: ChatCompletionRequest, *, check_template: bool = False
    ) -> type[ToolCallParser] | None:
        """The parser of this server's model when the request enables tools; a 400 when the model cannot take them.

        ``tool_choice`` "none": the tools are neither rendered nor looked for in the reply.
        """
        if not request.tools_enabled:
            return None
        renderer, model = self.ctx.renderer, self.ctx.model_name
        if check_template and not renderer.renders_tools():
            raise InvalidRequest(
                f"this model's chat template does not render tools: '{model}' cannot be given tools", param="tools"
            )
        return require_parser(self.ctx.server.tool_call_parser, renderer.chat_template, model)

    def _speaker(self, request: ChatCompletionRequest) -> SpeechSynthesizer:
        """The synthesizer that speaks this request's reply; a 400 when there is none or the voice is unknown."""
        if self.speech is None:
            raise cannot_speak(self.ctx, "cannot produce audio", param="modalities")
        assert request.audio is not None  # the request's own check: audio output comes with ``audio``
        self.speech.check_voice(request.audio.voice_name, param="audio.voice")
        return self.speech

    def _with_transcripts(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        """Assistant turns sent back as ``audio: {id}`` alone, with the text of that spoken reply when this server
        still knows the id (``expires_at``); else they are read as empty turns."""
        replies = self.speech.replies if self.speech is not None else None
        resolved: list[ChatMessage] = []
        for message in messages:
            if isinstance(message, AssistantMessage) and message.audio is not None and message.content is None:
                text = replies.transcript(message.audio.id) if replies is not None else None
                message = message.model_copy(update={"content": text or ""})
            resolved.append(message)
        return resolved

    async def chunks(self, request: ChatCompletionRequest, submitted: Submitted) -> AsyncIterator[dict[str, Any]]:
        if not request.speaks:
            async for item in self._text_chunks(request, submitted):
                yield item
            return
        speaker, voice = self._speaker(request), request.audio.voice_name  # type: ignore[union-attr]

        async def speak(text: str) -> Any:
            return (await speaker.synthesize(text, voice=voice, instructions=None)).samples

        stream = SpokenStream(speak, speaker.sample_rate)
        spoken = spoken_chunks(self._text_chunks(request, submitted), stream, speaker.replies, new_id("audio"))
        async for item in spoken:
            yield item

    async def _text_chunks(self, request: ChatCompletionRequest, submitted: Submitted) -> AsyncIterator[dict[str, Any]]:
        request_id, created, model = submitted.jobs[0].request_id, now(), request.model
        parser_class = self._parser_class(request)
        starts = self._reasoning_start(submitted)
        if parser_class is not None or starts is not None:
            async for item in self._parsed_chunks(request, submitted, parser_class, starts):
                yield item
            return

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

    def _reasoning_start(self, submitted: Submitted) -> bool | None:
        """None when replies are not split into reasoning and content; else whether they start as reasoning."""
        mode = self.ctx.server.reasoning_parser
        if mode == "none" or (mode == "auto" and not template_thinks(self.ctx.renderer.chat_template or "")):
            return None
        return prompt_opens_block(submitted.jobs[0].prompt.text or "")

    async def _parsed_chunks(
        self,
        request: ChatCompletionRequest,
        submitted: Submitted,
        parser_class: type[ToolCallParser] | None,
        starts_in_reasoning: bool | None,
    ) -> AsyncIterator[dict[str, Any]]:
        """``chunks`` with each choice's text split into reasoning and answer, and the answer run through the
        tool parser: reasoning, content and calls as each becomes certain."""
        request_id, created, model = submitted.jobs[0].request_id, now(), request.model

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> dict[str, Any]:
            return dump(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage))

        parsers = [new_parser(parser_class, submitted) for _ in range(request.n)]
        splitters = [
            ReasoningSplitter(starts_in_reasoning=starts_in_reasoning) if starts_in_reasoning is not None else None
            for _ in range(request.n)
        ]
        calls = [0] * request.n
        for i in range(request.n):
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        async for _, delta in submitted.deltas():
            i = delta.index
            splitter, parser = splitters[i], parsers[i]
            pieces = splitter.feed(delta.text) if splitter else [Piece("content", delta.text)]
            if delta.finish_reason is not None and splitter:
                pieces += splitter.finish()
            deltas: list[DeltaMessage] = []
            for piece in pieces:
                if piece.kind == "reasoning":
                    deltas.append(DeltaMessage(reasoning_content=piece.text))
                    continue
                events = parser.feed(piece.text) if parser else [TextPiece(piece.text)]
                deltas += stream_deltas(events, calls[i], parser)
                calls[i] += sum(isinstance(e, ParsedCall) for e in events)
            if delta.finish_reason is not None and parser:
                events = parser.finish()
                deltas += stream_deltas(events, calls[i], parser)
                calls[i] += sum(isinstance(e, ParsedCall) for e in events)
            deltas = [d for d in deltas if d.tool_calls or d.content or d.reasoning_content]
            if not deltas and (delta.finish_reason is not None or delta.logprobs):
                deltas = [DeltaMessage()]  # nothing to say yet, but logprobs or the end to report
            for k, message in enumerate(deltas):
                last = k == len(deltas) - 1
                yield chunk(
                    [
                        ChatChunkChoice(
                            index=i,
                            delta=message,
                            logprobs=chat_logprobs(delta.logprobs) if k == 0 else None,
                            finish_reason=tool_finish(delta.finish_reason, calls[i]) if last else None,
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
        parser_class = self._parser_class(request)
        starts = self._reasoning_start(submitted)
        choices = []
        for i in range(request.n):
            reasoning, answer = split(texts[i], starts_in_reasoning=starts) if starts is not None else (None, texts[i])
            message, calls = message_of(answer, new_parser(parser_class, submitted))
            message.reasoning_content = reasoning
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    logprobs=chat_logprobs(logprobs[i]),
                    finish_reason=tool_finish(finish[i], calls),
                )
            )
        if request.speaks:
            await self._speak_reply(request, choices[0].message)
        return dump(
            ChatCompletion(
                id=submitted.jobs[0].request_id,
                model=request.model,  # the base's name, or the LoRA adapter's the request named
                choices=choices,
                usage=submitted.usage(),
            )
        )

    async def _speak_reply(self, request: ChatCompletionRequest, message: AssistantOut) -> None:
        """The reply's text spoken whole into ``message.audio``; the text becomes its transcript (content null, as
        OpenAI answers). A reply without text (only tool calls) has nothing to speak and stays as it is."""
        text = message.content or ""
        if not text.strip():
            return
        speaker, audio = self._speaker(request), request.audio
        assert audio is not None
        speech = await speaker.synthesize(text, voice=audio.voice_name, instructions=None)
        data = await asyncio.to_thread(encode, speech.samples, speech.sample_rate, wire_format(audio.format))
        audio_id = new_id("audio")
        expires_at = speaker.replies.remember(audio_id, text)
        message.audio = ChatAudioOut(id=audio_id, data=b64(data), expires_at=expires_at, transcript=text)
        message.content = None
