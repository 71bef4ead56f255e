"""POST /v1/responses (and GET / DELETE of stored responses): OpenAI's Responses API on the chat path.

A Responses request becomes one chat conversation: ``instructions`` as the system message, the
stored conversation of ``previous_response_id`` (its input and output items), then the request's
input items (messages with text, image and audio parts; ``function_call`` items as the assistant's
tool calls; ``function_call_output`` items as tool results). That conversation goes through the chat
endpoint's own preparation (``ChatServing.prepare``): the same media limits, template, tool
rendering, structured outputs and engine. What the model writes is parsed by the chat path's
tool-call parser and shaped as Responses output items and stream events (under an enforced call
grammar a call's item opens as soon as its name is written and its arguments stream as
``response.function_call_arguments.delta`` events while the model writes them); a response asked to be
stored is written (one transaction) before its last event or its answer is sent, so the client can
continue from it at once.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from omniserve.engines.base import GenerationRequest
from omniserve.errors import InvalidRequest, OmniServeError, UnsupportedParameter
from omniserve.protocol import ChatCompletionRequest, dump
from omniserve.protocol_responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputAudio,
    InputImage,
    InputItem,
    InputItemList,
    InputText,
    MessageItem,
    OutputText,
    Refusal,
    Response,
    ResponseContentPartEvent,
    ResponseDeleted,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseLifecycleEvent,
    ResponseOutputItemEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponsesRequest,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
    TextFormatJsonObject,
    TextFormatJsonSchema,
    ToolChoiceFunction,
    item_id,
    responses_union_tags,
)
from omniserve.responses_store import ResponseNotFound, ResponsesStore, StoredResponse, store_off
from omniserve.server.errors import parse_body
from omniserve.server.serving_base import OpenAIServing, ServingContext, Submitted
from omniserve.server.serving_chat import ChatServing, new_parser, tool_call_id
from omniserve.tools.base import ArgumentsPiece, CallStart, Event, TextPiece, ToolCallParser
from omniserve.tools.registry import require_parser
from omniserve.validation import describe_validation_error, openai_union_tags

_ITEMS = TypeAdapter(list[InputItem])
#: Chat request fields whose Responses names differ, for errors the chat path reports.
_CHAT_NAMES = (("max_completion_tokens", "max_output_tokens"), ("response_format", "text.format"))


class _Body(BaseModel):
    """Any JSON object: ``parse_body``'s checks (JSON, depth, lone surrogates) before the strict model."""

    model_config = ConfigDict(extra="allow")


class ResponsesServing(OpenAIServing[ResponsesRequest]):
    request_model = ResponsesRequest
    endpoint = "responses"

    def __init__(self, ctx: ServingContext, store: ResponsesStore | None) -> None:
        super().__init__(ctx)
        self.store = store
        self.id = item_id("resp")
        self.created_at = time.time()
        self._chat: ChatCompletionRequest | None = None
        self._items: list[dict[str, Any]] = []  # this request's input items, with ids (what is stored)
        self._history: list[dict[str, Any]] = []  # the stored conversation it continues

    # ---------------------------------------------------------------- request -> chat

    async def parse(self, http_request: Request) -> ResponsesRequest:
        payload = parse_body(_Body, await http_request.body()).model_extra or {}
        try:
            return ResponsesRequest.model_validate(payload)
        except ValidationError as exc:
            problem = describe_validation_error(exc, union_tags=openai_union_tags() | responses_union_tags())
            if problem.kind == "extra_forbidden":
                raise InvalidRequest(
                    f"Unrecognized request argument supplied: {problem.location}",
                    param=problem.location,
                    code="unrecognized_argument",
                ) from None
            raise InvalidRequest(problem.message, param=problem.location) from None

    async def prepare(self, request: ResponsesRequest) -> list[GenerationRequest]:
        if request.previous_response_id is not None:
            previous = await self._stored(request.previous_response_id, param="previous_response_id")
            self._history = previous.conversation
        own = request.input_items()
        self._items = [_with_id(item) for item in own]
        messages: list[dict[str, Any]] = []
        origins: list[str] = []
        if request.instructions is not None:
            messages.append({"role": "system", "content": request.instructions})
            origins.append("instructions")
        for item in _ITEMS.validate_python(self._history):  # stored turns: their errors name the id that brought them
            _append(messages, origins, item, "previous_response_id")
        for i, item in enumerate(own):
            _append(messages, origins, item, f"input[{i}]")
        chat = _chat_request(request, messages, origins)
        self._chat = chat
        try:
            return await ChatServing(self.ctx).prepare(chat)
        except OmniServeError as exc:
            exc.param = _responses_param(exc.param, origins)
            raise

    async def _stored(self, response_id: str, *, param: str | None = None) -> StoredResponse:
        if self.store is None:
            if param is not None:
                raise store_off(param)
            raise ResponseNotFound(
                f"Response with id '{response_id}' not found: this server stores no responses (--responses-store none)"
            )
        stored = await self.store.get(response_id)
        if stored is None:
            raise ResponseNotFound(f"Response with id '{response_id}' not found.", param=param)
        return stored

    # ---------------------------------------------------------------- engine -> response

    def _parser(self, submitted: Submitted) -> ToolCallParser | None:
        """The chat path's parser for this reply: incremental where the chat path enforced the call grammar."""
        chat = self._chat
        if chat is None or not chat.tools_enabled:
            return None
        parser = require_parser(self.ctx.server.tool_call_parser, self.ctx.renderer.chat_template, self.ctx.model_name)
        return new_parser(parser, submitted)

    async def chunks(self, request: ResponsesRequest, submitted: Submitted) -> AsyncIterator[dict[str, Any]]:
        parser = self._parser(submitted)
        answer = _Answer(self._skeleton(request), parser)
        for event in answer.start():
            yield event
        finish: str | None = None
        async for _, delta in submitted.deltas():
            pieces = parser.feed(delta.text) if parser else ([TextPiece(delta.text)] if delta.text else [])
            if delta.finish_reason is not None:
                finish = delta.finish_reason
                pieces += parser.finish() if parser else []
            for event in answer.add(pieces):
                yield event
        events = answer.finish(finish, _usage(submitted))
        await self._keep(request, answer.response)
        for event in events:
            yield event

    async def collect(self, request: ResponsesRequest, submitted: Submitted) -> dict[str, Any]:
        text, finish = "", None
        async for _, delta in submitted.deltas():
            text += delta.text
            finish = delta.finish_reason or finish
        parser = self._parser(submitted)
        answer = _Answer(self._skeleton(request), parser)
        answer.add(parser.parse_all(text) if parser else [TextPiece(text)] if text else [])
        answer.finish(finish, _usage(submitted))
        await self._keep(request, answer.response)
        return dump(answer.response)

    def _skeleton(self, request: ResponsesRequest) -> Response:
        """The Response object before any output: what ``response.created`` carries."""
        fmt = request.text.format if request.text and request.text.format else None
        return Response(
            id=self.id,
            created_at=self.created_at,
            status="in_progress",
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            model=request.model,  # the base's name, or the LoRA adapter's the request named
            parallel_tool_calls=request.parallel_tool_calls is not False,
            previous_response_id=request.previous_response_id,
            store=request.stores and self.store is not None,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            text={"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            tool_choice=request.tool_choice_wire(),
            tools=[tool.model_dump(exclude_none=True) for tool in request.tools or ()],
            user=request.user,
            metadata=request.metadata or {},
        )

    async def _keep(self, request: ResponsesRequest, response: Response) -> None:
        if not request.stores or self.store is None:
            return
        output = [item.model_dump(mode="json") for item in response.output]
        await self.store.put(
            StoredResponse(
                id=response.id,
                created_at=response.created_at,
                response=dump(response),
                input_items=self._items,
                conversation=[*self._history, *self._items, *output],
            )
        )

    # ---------------------------------------------------------------- stored responses

    async def retrieve(self, response_id: str) -> dict[str, Any]:
        return (await self._stored(response_id)).response

    async def delete(self, response_id: str) -> dict[str, Any]:
        if self.store is None or not await self.store.delete(response_id):
            await self._stored(response_id)  # the 404, worded for the case
        return dump(ResponseDeleted(id=response_id))

    async def input_items(self, response_id: str, *, after: str | None, limit: int, order: str) -> dict[str, Any]:
        items = list((await self._stored(response_id)).input_items)
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [item.get("id") for item in items]
            if after not in ids:
                raise InvalidRequest(f"no input item '{after}' in response '{response_id}'", param="after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return dump(
            InputItemList(
                data=page,
                first_id=page[0]["id"] if page else None,
                last_id=page[-1]["id"] if page else None,
                has_more=len(items) > limit,
            )
        )


# ---------------------------------------------------------------- input items -> chat messages


def _with_id(item: Any) -> dict[str, Any]:
    """An input item as stored and listed (``input_items``): with an id, a type, and content as a list of parts."""
    data = item.model_dump(mode="json", by_alias=True, exclude_none=True)
    if "id" not in data:
        data["id"] = item_id({"message": "msg", "function_call": "fc"}.get(data.get("type", "message"), "fco"))
    data.setdefault("type", "message")
    if data["type"] == "message" and isinstance(data["content"], str):
        assistant = data["role"] == "assistant"
        part = {"type": "output_text", "text": data["content"], "annotations": []} if assistant else None
        data["content"] = [part or {"type": "input_text", "text": data["content"]}]
    return data


def _text_of(parts: str | list[Any], param: str) -> str:
    """Text-only content (system, developer, assistant, tool results) as one string."""
    if isinstance(parts, str):
        return parts
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, InputText | OutputText):
            texts.append(part.text)
        elif isinstance(part, Refusal):
            texts.append(part.refusal)
        else:
            raise InvalidRequest(f"{param}.content[{j}]: only text can be given here", param=f"{param}.content[{j}]")
    return "".join(texts)


def _user_part(part: Any, param: str) -> dict[str, Any]:
    if isinstance(part, InputText | OutputText):
        return {"type": "text", "text": part.text}
    if isinstance(part, Refusal):
        return {"type": "text", "text": part.refusal}
    if isinstance(part, InputImage):
        if part.image_url is None:
            raise UnsupportedParameter(
                f"{param}: file_id needs a Files API, which this server does not have; give image_url (a URL or "
                "a data: URL)",
                param=f"{param}.file_id" if part.file_id else f"{param}.image_url",
            )
        return {"type": "image_url", "image_url": {"url": part.image_url}}
    if isinstance(part, InputAudio):
        return {"type": "input_audio", "input_audio": part.input_audio.model_dump()}
    raise UnsupportedParameter(f"{param}: input_file parts are not supported by this server", param=param)


def _append(messages: list[dict[str, Any]], origins: list[str], item: Any, where: str) -> None:
    if isinstance(item, MessageItem):
        if item.role == "user":
            content: Any = item.content
            if not isinstance(content, str):
                content = [_user_part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]
        else:
            content = _text_of(item.content, where)
        messages.append({"role": item.role, "content": content})
    elif isinstance(item, FunctionCallItem):
        call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":  # parallel calls, or text then calls: one turn
            last.setdefault("tool_calls", []).append(call)
            return
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    else:
        assert isinstance(item, FunctionCallOutputItem)
        output = item.output if isinstance(item.output, str) else _text_of(item.output, f"{where}.output")
        messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    origins.append(where)


def _chat_request(
    request: ResponsesRequest, messages: list[dict[str, Any]], origins: list[str]
) -> ChatCompletionRequest:
    fmt = request.text.format if request.text else None
    response_format: dict[str, Any] | None = None
    if isinstance(fmt, TextFormatJsonObject):
        response_format = {"type": "json_object"}
    elif isinstance(fmt, TextFormatJsonSchema):
        spec = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
        response_format = {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}
    choice = request.tool_choice
    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "max_completion_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "tools": [
            {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
            for tool in request.tools
        ]
        if request.tools
        else None,
        "tool_choice": {"type": "function", "function": {"name": choice.name}}
        if isinstance(choice, ToolChoiceFunction)
        else choice,
        "parallel_tool_calls": request.parallel_tool_calls,
        "response_format": response_format,
        "user": request.user,
    }
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        problem = describe_validation_error(exc)
        location = _responses_param(problem.location, origins)
        message = problem.message
        if problem.location and location and problem.location != location:
            message = message.replace(problem.location, location, 1)
        raise InvalidRequest(message, param=location) from None
    except OmniServeError as exc:
        exc.param = _responses_param(exc.param, origins)
        raise


def _responses_param(param: str | None, origins: list[str]) -> str | None:
    """A chat path's ``param`` (``messages[2].content[0]``) as the Responses request names it (``input[1]...``)."""
    if param is None:
        return None
    found = re.match(r"messages\[(\d+)\]", param)
    if found and int(found.group(1)) < len(origins):
        return origins[int(found.group(1))] + param[found.end() :]
    tool = re.match(r"tools\[(\d+)\]\.function", param)
    if tool:
        return f"tools[{tool.group(1)}]" + param[tool.end() :]
    for chat, ours in _CHAT_NAMES:
        if param.startswith(chat):
            return ours + param[len(chat) :]
    return param


# ---------------------------------------------------------------- the answer, as events and as an object


def _usage(submitted: Submitted) -> ResponseUsage:
    usage = submitted.usage()
    return ResponseUsage(
        input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens, total_tokens=usage.total_tokens
    )


class _Answer:
    """Builds the output items from parser events, and the stream events that say so, in one pass.

    The stream and the non-streamed answer both run through it, so they hold the same items. Text
    opens a message item (closed when a call follows, so items keep the order the model wrote them);
    each call is one ``function_call`` item: ``output_item.added`` (its name and call id, no arguments yet),
    its arguments as ``function_call_arguments.delta`` events, then ``function_call_arguments.done`` and
    ``output_item.done``. An incremental parser gives the arguments in the pieces the model writes them in
    (``CallStart``, ``ArgumentsPiece``s, the closing ``ParsedCall``); otherwise a call comes whole, in one delta.
    """

    def __init__(self, response: Response, parser: ToolCallParser | None = None) -> None:
        self.response = response
        self._parser = parser  # whose format says what a call id looks like
        self._sequence = 0
        self._message: ResponseOutputMessage | None = None
        self._call: ResponseFunctionToolCall | None = None  # the call whose arguments are streaming

    def _event(self, event_type: type[BaseModel], **fields: Any) -> dict[str, Any]:
        event = dump(event_type(sequence_number=self._sequence, **fields))
        self._sequence += 1
        return event

    def _lifecycle(self, kind: str) -> dict[str, Any]:
        return self._event(ResponseLifecycleEvent, type=kind, response=self.response)

    def start(self) -> list[dict[str, Any]]:
        return [self._lifecycle("response.created"), self._lifecycle("response.in_progress")]

    def add(self, pieces: list[Event]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for piece in pieces:
            if isinstance(piece, TextPiece):
                if piece.text:
                    events += self._text(piece.text)
            elif isinstance(piece, CallStart):
                events += self._open_call(piece.name)
            elif isinstance(piece, ArgumentsPiece):
                events += self._arguments(piece.text)
            elif piece.opened:  # its name and arguments were given already
                events += self._close_call("completed")
            else:
                events += self._open_call(piece.name) + self._arguments(piece.arguments)
                events += self._close_call("completed")
        return events

    def _open_message(self) -> list[dict[str, Any]]:
        message = ResponseOutputMessage(id=item_id("msg"), status="in_progress", content=[])
        index = len(self.response.output)
        events = [
            self._event(ResponseOutputItemEvent, type="response.output_item.added", output_index=index, item=message)
        ]
        message.content.append(ResponseOutputText(text=""))
        events.append(
            self._event(
                ResponseContentPartEvent,
                type="response.content_part.added",
                item_id=message.id,
                output_index=index,
                content_index=0,
                part=ResponseOutputText(text=""),
            )
        )
        self.response.output.append(message)
        self._message = message
        return events

    def _text(self, text: str) -> list[dict[str, Any]]:
        events = self._open_message() if self._message is None else []
        message = self._message
        assert message is not None
        message.content[0].text += text
        index = len(self.response.output) - 1
        events.append(
            self._event(ResponseTextDeltaEvent, item_id=message.id, output_index=index, content_index=0, delta=text)
        )
        return events

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        message = self._message
        if message is None:
            return []
        self._message = None
        index = self.response.output.index(message)
        part = message.content[0]
        message.status = status  # type: ignore[assignment]
        where = {"item_id": message.id, "output_index": index, "content_index": 0}
        return [
            self._event(ResponseTextDoneEvent, text=part.text, **where),
            self._event(ResponseContentPartEvent, type="response.content_part.done", part=part, **where),
            self._event(ResponseOutputItemEvent, type="response.output_item.done", output_index=index, item=message),
        ]

    def _open_call(self, name: str) -> list[dict[str, Any]]:
        events = self._close_message("completed") + self._close_call("completed")
        item = ResponseFunctionToolCall(
            id=item_id("fc"), call_id=tool_call_id(self._parser), name=name, arguments="", status="in_progress"
        )
        index = len(self.response.output)
        self.response.output.append(item)
        self._call = item
        events.append(
            self._event(ResponseOutputItemEvent, type="response.output_item.added", output_index=index, item=item)
        )
        return events

    def _arguments(self, text: str) -> list[dict[str, Any]]:
        item = self._call
        if item is None or not text:
            return []
        item.arguments += text
        where = {"item_id": item.id, "output_index": self.response.output.index(item)}
        return [self._event(ResponseFunctionCallArgumentsDeltaEvent, delta=text, **where)]

    def _close_call(self, status: str) -> list[dict[str, Any]]:
        item, self._call = self._call, None
        if item is None:
            return []
        index = self.response.output.index(item)
        item.status = status  # type: ignore[assignment]
        return [
            self._event(
                ResponseFunctionCallArgumentsDoneEvent, item_id=item.id, output_index=index, arguments=item.arguments
            ),
            self._event(ResponseOutputItemEvent, type="response.output_item.done", output_index=index, item=item),
        ]

    def finish(self, finish_reason: str | None, usage: ResponseUsage) -> list[dict[str, Any]]:
        """Close what is open and settle the status: cut by the token limit is ``incomplete``."""
        cut = finish_reason == "length"
        events = self._open_message() if not self.response.output else []  # an empty answer is an empty message
        events += self._close_message("incomplete" if cut else "completed")
        events += self._close_call("incomplete" if cut else "completed")  # a parser closes its calls: a safeguard
        response = self.response
        response.usage = usage
        response.completed_at = time.time()
        if cut:
            response.status = "incomplete"
            response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
            return [*events, self._lifecycle("response.incomplete")]
        response.status = "completed"
        return [*events, self._lifecycle("response.completed")]
