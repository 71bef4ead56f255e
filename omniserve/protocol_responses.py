"""OpenAI's Responses API on the wire: the request, its input items, the Response object and its stream events.

Names mirror the official types (``openai.types.responses``). The request is strict like every
omniserve request: an unknown field is refused, and a field OpenAI defines that this server does not
implement (``reasoning``, built-in tools, ``background``, ``truncation: "auto"``, ``include``...) is a
400 naming it, never ignored. ``to_chat`` turns a request into the one chat conversation the chat
endpoint already knows how to render, constrain and run (server/serving_responses.py).
"""

from __future__ import annotations

import functools
import typing
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, RootModel, Tag, field_validator, model_validator

from omniserve.errors import InvalidRequest, UnsupportedParameter
from omniserve.protocol import TOOL_NAME_PATTERN


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def item_id(prefix: str) -> str:
    """OpenAI's shape of an item id (``msg_``, ``fc_``, ``resp_`` and 48 hex characters)."""
    return f"{prefix}_{uuid.uuid4().hex}{uuid.uuid4().hex[:16]}"


# ---------------------------------------------------------------- input content parts


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class InputImage(_Strict):
    type: Literal["input_image"]
    image_url: str | None = Field(None, min_length=1)
    file_id: str | None = None
    detail: Literal["low", "high", "auto", "original"] = "auto"


class InputAudioData(_Strict):
    data: str = Field(min_length=1)
    format: str = Field(min_length=1)


class InputAudio(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudioData


class InputFile(_Strict):
    type: Literal["input_file"]
    file_id: str | None = None
    file_data: str | None = None
    file_url: str | None = None
    filename: str | None = None
    detail: Literal["low", "high", "auto"] | None = None


class OutputText(_Strict):
    """Text of an earlier answer, when a client sends the previous ``output`` back as input."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] | None = None


class Refusal(_Strict):
    type: Literal["refusal"]
    refusal: str


InputPart = Annotated[
    InputText | InputImage | InputAudio | InputFile | OutputText | Refusal, Field(discriminator="type")
]


# ---------------------------------------------------------------- input items


class MessageItem(_Strict):
    """A message: ``{"role", "content"}`` (EasyInputMessage, ``type`` optional) or a replayed output message."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(_Strict):
    """A call the model made (sent back so its result can follow)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(_Strict):
    """The result of running a call, answering its ``call_id``."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[Annotated[InputText | InputImage | InputFile, Field(discriminator="type")]]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


#: Item types of the input list this server reads; any other OpenAI item type is refused by name.
ITEM_TYPES = ("message", "function_call", "function_call_output")


def _item_tag(value: Any) -> str | None:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None) or "message"
    return kind if kind in ITEM_TYPES else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_tag),
]


# ---------------------------------------------------------------- tools and formats


class FunctionToolParam(_Strict):
    """Responses' flat function tool (``{"type": "function", "name", ...}``, not chat's nested ``function``)."""

    type: Literal["function"]
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormatText(_Strict):
    type: Literal["text"]


class TextFormatJsonObject(_Strict):
    type: Literal["json_object"]


class TextFormatJsonSchema(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["json_schema"]
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")]


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class StreamOptions(_Strict):
    include_obfuscation: bool | None = None  # omniserve never pads its events: nothing to turn off


#: Fields OpenAI defines that this server does not implement, and the values that ask for nothing.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "background": (None, False),
    "background_options": (None,),
    "context_management": (None, []),
    "conversation": (None,),
    "include": (None, []),
    "max_tool_calls": (None,),
    "moderation": (None,),
    "prompt": (None,),
    "prompt_cache_retention": (None,),
    "prompt_cache_options": (None,),
    "reasoning": (None,),
    "top_logprobs": (None, 0),
    "truncation": (None, "disabled"),
    "image": (None,),
    "access_programs": (None,),
}


# ---------------------------------------------------------------- the request


class ResponsesRequest(_Strict):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: Annotated[list[FunctionToolParam], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    store: bool | None = None  # absent: true, as OpenAI
    previous_response_id: str | None = Field(None, min_length=1)
    text: TextConfig | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    user: str | None = None
    # hints that change nothing a client can observe here (no prompt cache, one service tier)
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    # defined by OpenAI, not implemented here: any value other than "nothing" is refused by name
    background: Any = None
    background_options: Any = None
    context_management: Any = None
    conversation: Any = None
    include: Any = None
    max_tool_calls: Any = None
    moderation: Any = None
    prompt: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    reasoning: Any = None
    top_logprobs: Any = None
    truncation: Any = None
    image: Any = None
    access_programs: Any = None

    @property
    def n(self) -> int:
        """One answer per request (what the shared serving path reads)."""
        return 1

    @property
    def stores(self) -> bool:
        return self.store is not False

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value: Any) -> Any:
        for i, tool in enumerate(value if isinstance(value, list) else ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind != "function":
                raise UnsupportedParameter(
                    f"tools[{i}]: the built-in tool type {kind!r} is not supported by this server; only "
                    '"function" tools are',
                    param=f"tools[{i}].type",
                )
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise UnsupportedParameter(
                f"tool_choice of type {kind!r} is not supported by this server", param="tool_choice.type"
            )
        return value

    @field_validator("input", mode="before")
    @classmethod
    def _known_items(cls, value: Any) -> Any:
        for i, item in enumerate(value if isinstance(value, list) else ()):
            kind = item.get("type") if isinstance(item, dict) else None
            if isinstance(kind, str) and kind not in ITEM_TYPES:
                raise UnsupportedParameter(
                    f"input[{i}]: items of type {kind!r} are not supported by this server (supported: "
                    f"{', '.join(ITEM_TYPES)})",
                    param=f"input[{i}].type",
                )
        return value

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        for name, nothing in _UNSUPPORTED.items():
            value = getattr(self, name)
            if not any(value == allowed and type(value) is type(allowed) for allowed in nothing):
                raise UnsupportedParameter(f"{name} is not supported by this server", param=name)
        if self.text is not None and self.text.verbosity is not None:
            raise UnsupportedParameter("text.verbosity is not supported by this server", param="text.verbosity")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
        if isinstance(self.input, list) and not self.input:
            raise InvalidRequest("input must not be an empty list", param="input")
        for key in self.metadata or {}:
            if len(key) > 64:
                raise InvalidRequest("metadata keys may be at most 64 characters long", param="metadata")
        return self

    def input_items(self) -> list[InputItem]:
        """``input`` as a list of items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(type="message", role="user", content=[InputText(type="input_text", text=self.input)])]
        return list(self.input)

    def tool_choice_wire(self) -> str | dict[str, Any]:
        """``tool_choice`` as the Response object echoes it."""
        if self.tool_choice is None:
            return "auto"
        return self.tool_choice if isinstance(self.tool_choice, str) else self.tool_choice.model_dump()


@functools.cache
def responses_union_tags() -> frozenset[str]:
    """Discriminator values of this module's unions, dropped from validation-error locations."""
    tags = set(ITEM_TYPES)
    for member in typing.get_args(typing.get_args(InputPart)[0]):
        tags.update(typing.get_args(member.model_fields["type"].annotation))
    return frozenset(tags | {"function", "text", "json_object", "json_schema"})


# ---------------------------------------------------------------- the answer


class ResponseOutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ResponseOutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[ResponseOutputText]


class ResponseFunctionToolCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = Annotated[ResponseOutputMessage | ResponseFunctionToolCall, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: float
    completed_at: float | None = None
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    store: bool
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    background: bool = False
    reasoning: dict[str, Any] | None = None
    service_tier: Literal["default"] = "default"


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ---------------------------------------------------------------- stream events


class _Event(BaseModel):
    sequence_number: int


class ResponseLifecycleEvent(_Event):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete"]
    response: Response


class ResponseOutputItemEvent(_Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ResponseContentPartEvent(_Event):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int
    part: ResponseOutputText


class ResponseTextDeltaEvent(_Event):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class ResponseTextDoneEvent(_Event):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ResponseFunctionCallArgumentsDeltaEvent(_Event):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class ResponseFunctionCallArgumentsDoneEvent(_Event):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    arguments: str


class ResponseStreamEvent(
    RootModel[
        ResponseLifecycleEvent
        | ResponseOutputItemEvent
        | ResponseContentPartEvent
        | ResponseTextDeltaEvent
        | ResponseTextDoneEvent
        | ResponseFunctionCallArgumentsDeltaEvent
        | ResponseFunctionCallArgumentsDoneEvent
    ]
):
    """One event of a streamed response (what /openapi.json documents for ``stream: true``)."""
