"""OpenAI wire types (requests, responses, stream chunks) as pydantic models with OpenAI's names.

Requests are strict (``extra="forbid"``): a field we do not implement is refused with a 400 that
names it, as OpenAI itself does ("Unrecognized request argument"), instead of being silently
ignored. Each request model owns its conversion to engine-neutral ``SamplingParams``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from omniserve.errors import InvalidRequest, UnsupportedParameter
from omniserve.protocol_speech import VoiceId
from omniserve.sampling import SamplingParams
from omniserve.structured.spec import StructuredOutput

#: Stop strings per request: OpenAI's own limit ("up to 4 sequences").
MAX_STOP_SEQUENCES = 4
#: Characters in one stop string. Text that may still begin a stop is held back from the stream,
#: so a longer stop would delay streaming by as much; real stops ("</answer>", "\nUser:") are short.
MAX_STOP_CHARS = 256
#: ``seed`` is a signed 64-bit integer, as OpenAI's API and vLLM define it; every engine accepts
#: that range (the transformers engine seeds choice ``i`` with ``seed + i``, within torch's range).
MIN_SEED = -(2**63)
MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- content parts


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str = Field(min_length=1)


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


class InputAudio(_Strict):
    data: str = Field(min_length=1)
    format: str = Field(min_length=1)


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURL(_Strict):
    url: str = Field(min_length=1)


class AudioURLPart(_Strict):
    type: Literal["audio_url"]
    audio_url: AudioURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart | InputAudioPart | AudioURLPart, Field(discriminator="type")]
MediaPart = ImagePart | VideoPart | InputAudioPart | AudioURLPart


# ---------------------------------------------------------------- messages


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)]
    name: str | None = None


class FunctionCall(_Strict):
    """A call as the assistant wrote it; ``arguments`` is a JSON object encoded as a string, as OpenAI sends it."""

    name: str = Field(min_length=1)
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _check_arguments(cls, value: str) -> str:
        # templates write the arguments into the prompt as JSON: a string that is not a JSON object
        # would give the model a conversation it never saw in training
        try:
            parsed = json.loads(value)
        except ValueError:
            raise ValueError("arguments must be a JSON object encoded as a string") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object encoded as a string")
        return value


class ToolCall(_Strict):
    id: str = Field(min_length=1)
    type: Literal["function"]
    function: FunctionCall


class AudioRef(_Strict):
    """A previous spoken reply, sent back by id as OpenAI's clients do (``message.audio.id`` of that reply)."""

    id: str = Field(min_length=1)


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    #: A spoken reply in the history: the server puts its transcript in the turn when it still knows the id,
    #: else the turn is read as empty text (``omniserve.speech.chat_audio.SpokenReplies``).
    audio: AudioRef | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls and self.audio is None:
            raise ValueError("an assistant message needs content, tool_calls or audio")
        return self


class ToolMessage(_Strict):
    """A tool's result, answering the assistant's call ``tool_call_id`` (checked by the request)."""

    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str = Field(min_length=1)


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


# ---------------------------------------------------------------- tools

#: OpenAI's rule for function names (letters, digits, ``_`` and ``-``, at most 64).
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
#: OpenAI's limit on the tools of one request.
MAX_TOOLS = 128


class FunctionDefinition(_Strict):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _check_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # a function's parameters are the fields of one JSON object: its schema says so, or says nothing
        if value is not None and value.get("type", "object") != "object":
            raise ValueError('parameters must be a JSON schema of an object ("type": "object")')
        if value is not None and not isinstance(value.get("properties", {}), dict):
            raise ValueError("parameters.properties must be an object mapping names to schemas")
        return value


class FunctionTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


#: ``audio.format`` values OpenAI defines; ``pcm16`` is raw 16-bit little-endian mono at the model's rate.
ChatAudioFormat = Literal["wav", "aac", "mp3", "flac", "opus", "pcm16"]
#: The formats a streamed reply can carry: OpenAI streams audio output as ``pcm16`` only (raw samples can be
#: played as they come; the others are files whose pieces are not playable on their own).
STREAMED_AUDIO_FORMATS = ("pcm16",)


class ChatAudioParam(_Strict):
    """``audio`` of a chat request (``openai.types.chat.ChatCompletionAudioParam``): how to speak the reply."""

    voice: str | VoiceId = Field(description="One of the checkpoint's speakers (GET /v1/audio/voices lists them).")
    format: ChatAudioFormat

    @property
    def voice_name(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceId) else self.voice


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class MultiModalOptions(_Strict):
    """Per-request media processing (extra body ``mm_processor_kwargs``), capped by the server's limits."""

    fps: float | None = Field(None, gt=0)
    max_frames: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)
    min_pixels: int | None = Field(None, gt=0)


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # absent: any JSON object
    strict: bool | None = None  # the schema is always enforced, strict or not


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StructuredOutputsOptions(_Strict):
    """vLLM's extra body ``structured_outputs``: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _schema_of(value: dict[str, Any] | str, param: str) -> StructuredOutput:
    """A JSON schema given as an object or as JSON text (vLLM's extra body accepts both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidRequest("the JSON schema is not valid JSON", param=param) from None
        if not isinstance(value, dict):
            raise InvalidRequest("the JSON schema must be an object", param=param)
    return StructuredOutput.json_schema(value, param)


# ---------------------------------------------------------------- shared sampling fields


class _SamplingFields(_Strict):
    model: str
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    stop: str | list[str] | None = None
    # vLLM's extra body field: token ids that end a choice like EOS does (kept even with ignore_eos)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # constrained decoding, as vLLM's extra body names it (the legacy guided_* fields and structured_outputs)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsOptions | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters long")
        return value

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _SamplingFields:
        if self.logit_bias:
            raise UnsupportedParameter("logit_bias is not supported by this server", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def _constraints(self) -> list[StructuredOutput]:
        """Every structured-output constraint the request sets (one at most is allowed)."""
        found: list[StructuredOutput] = []
        if self.guided_json is not None:
            found.append(_schema_of(self.guided_json, "guided_json"))
        if self.guided_regex is not None:
            found.append(StructuredOutput("regex", self.guided_regex, "guided_regex"))
        if self.guided_choice is not None:
            found.append(StructuredOutput.choice(self.guided_choice, "guided_choice"))
        if self.guided_grammar is not None:
            found.append(StructuredOutput("grammar", self.guided_grammar, "guided_grammar"))
        so = self.structured_outputs
        if so is not None:
            if so.json_ is not None:
                found.append(_schema_of(so.json_, "structured_outputs.json"))
            if so.regex is not None:
                found.append(StructuredOutput("regex", so.regex, "structured_outputs.regex"))
            if so.choice is not None:
                found.append(StructuredOutput.choice(so.choice, "structured_outputs.choice"))
            if so.grammar is not None:
                found.append(StructuredOutput("grammar", so.grammar, "structured_outputs.grammar"))
            if so.json_object:
                found.append(StructuredOutput("json_object", "", "structured_outputs.json_object"))
        return found

    def structured_output(self) -> StructuredOutput | None:
        """The one constraint on the output, if any; two at once is a 400 naming the second."""
        found = self._constraints()
        if len(found) > 1:
            raise InvalidRequest(
                f"only one structured-output constraint is allowed per request; {found[0].param} and "
                f"{found[1].param} are both set",
                param=found[1].param,
            )
        return found[0] if found else None

    def _stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def _sampling(
        self, *, max_tokens: int, logprobs: bool, top_logprobs: int, structured: StructuredOutput | None
    ) -> SamplingParams:
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            seed=self.seed,  # OpenAI's semantics: no seed, a random draw
            n=self.n,
            stop=self._stops(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            structured=structured,
        )


# ---------------------------------------------------------------- requests


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[FunctionTool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    mm_processor_kwargs: MultiModalOptions | None = None
    #: Extra variables for the checkpoint's chat template (e.g. Qwen3's ``enable_thinking``), checked
    #: against the variables the template reads (a 400 naming an unknown one).
    chat_template_kwargs: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    #: ``["text", "audio"]`` asks for a spoken reply too, in the voice and format of ``audio``.
    modalities: Annotated[list[Literal["text", "audio"]], Field(min_length=1)] | None = None
    audio: ChatAudioParam | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.store:
            raise UnsupportedParameter("store=true is not supported: this server keeps no completions", param="store")
        self._check_tools()
        self._check_audio()
        return self

    def _check_audio(self) -> None:
        """``audio`` exactly when ``modalities`` asks for audio; one choice; a streamable format when streaming."""
        if not self.speaks:
            if self.audio is not None:
                raise InvalidRequest(
                    'audio is only used when modalities asks for audio output: ["text", "audio"]', param="modalities"
                )
            return
        if self.audio is None:
            raise InvalidRequest(
                'modalities asks for audio output: give audio: {"voice": ..., "format": ...} too', param="audio"
            )
        if self.n > 1:  # each choice would be spoken in turn by the one talker: a reply costs n syntheses
            raise InvalidRequest("audio output is produced for one choice only: n must be 1", param="n")
        if self.stream and self.audio.format not in STREAMED_AUDIO_FORMATS:
            raise InvalidRequest(
                f"a streamed reply carries audio as {' or '.join(map(repr, STREAMED_AUDIO_FORMATS))} only, not "
                f"{self.audio.format!r}: ask for pcm16, or leave stream off for {self.audio.format}",
                param="audio.format",
            )

    @property
    def speaks(self) -> bool:
        """The reply is to be spoken as well as written."""
        return "audio" in (self.modalities or ())

    def _check_tools(self) -> None:
        """Tool names unique, ``tool_choice`` one we can honour, every tool result answering an earlier call."""
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            duplicate = next(name for name in names if names.count(name) > 1)
            raise InvalidRequest(f"tool names must be unique; '{duplicate}' appears twice", param="tools")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise InvalidRequest("tool_choice is only allowed when tools are specified", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequest(
                f"tool_choice names the function '{choice.function.name}', which is not among the tools",
                param="tool_choice",
            )
        if self.forces_tool_call and self._constraints():
            raise InvalidRequest(
                f"tool_choice {self._choice_words()} constrains the reply to tool calls; it cannot be combined "
                f"with {self._constraints()[0].param}",
                param="tool_choice",
            )
        calls: set[str] = set()
        for i, message in enumerate(self.messages):
            if isinstance(message, AssistantMessage):
                calls.update(call.id for call in message.tool_calls or ())
            elif isinstance(message, ToolMessage) and message.tool_call_id not in calls:
                raise InvalidRequest(
                    f"messages[{i}] answers tool call '{message.tool_call_id}', which no earlier assistant "
                    "message made",
                    param=f"messages[{i}].tool_call_id",
                )

    def _choice_words(self) -> str:
        choice = self.tool_choice
        return f"naming '{choice.function.name}'" if isinstance(choice, NamedToolChoice) else f"'{choice}'"

    @property
    def forces_tool_call(self) -> bool:
        """``tool_choice`` "required" or a named function: the reply must be calls, enforced by a grammar."""
        return bool(self.tools) and (self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice))

    def _constraints(self) -> list[StructuredOutput]:
        found = super()._constraints()
        fmt = self.response_format
        if isinstance(fmt, JsonObjectFormat):
            found.insert(0, StructuredOutput("json_object", "", "response_format"))
        elif isinstance(fmt, JsonSchemaFormat):
            schema = fmt.json_schema.schema_
            param = "response_format.json_schema.schema"
            spec = StructuredOutput("json_object", "", param) if schema is None else _schema_of(schema, param)
            found.insert(0, spec)
        return found

    @property
    def tools_enabled(self) -> bool:
        """Tools are rendered and the reply parsed for calls (``tool_choice`` "none": neither)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, *, max_tokens: int, structured: StructuredOutput | None = None) -> SamplingParams:
        """``structured``: the constraint the gateway settled on (``structured_output`` or the tool-call grammar)."""
        return self._sampling(
            max_tokens=max_tokens,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs or 0,
            structured=structured,
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.echo:
            raise UnsupportedParameter("echo is not supported by this server", param="echo")
        if self.suffix:
            raise UnsupportedParameter("suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedParameter("best_of other than n is not supported by this server", param="best_of")
        return self

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[str] | list[int] | list[list[int]]) -> object:
        if isinstance(value, list) and (len(value) == 0 or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: one string, a batch of strings, one token list or a batch of them."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(self, *, max_tokens: int, structured: StructuredOutput | None = None) -> SamplingParams:
        logprobs = self.logprobs is not None
        return self._sampling(
            max_tokens=max_tokens, logprobs=logprobs, top_logprobs=self.logprobs or 0, structured=structured
        )


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "omniserve"
    max_model_len: int | None = None
    root: str | None = None  # a LoRA adapter's folder (as vLLM lists it)
    parent: str | None = None  # a LoRA adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class _OmitsNone(BaseModel):
    """Fields left None are left out: the openai client's stream accumulator would overwrite a call's
    ``type`` or ``id`` with a later fragment's null, and replies without calls keep their usual shape."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None or key in self._keep}

    #: Fields written even when None (OpenAI's replies always carry them).
    _keep: frozenset[str] = frozenset()


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # a JSON object as a string, as OpenAI returns it


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatAudioOut(BaseModel):
    """A spoken reply (``openai.types.chat.ChatCompletionAudio``); ``transcript`` is the reply's text."""

    id: str
    data: str  # base64 of the whole audio in the request's format
    expires_at: int  # until then the id can stand for the reply in a later request's history
    transcript: str


class AssistantOut(_OmitsNone):
    _keep = frozenset({"role", "content"})

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # the reply's reasoning block, apart from the answer (vLLM's name)
    tool_calls: list[ToolCallOut] | None = None
    audio: ChatAudioOut | None = None  # with audio output: the text is its transcript, and content is null


class ChatChoice(BaseModel):
    index: int
    message: AssistantOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(_OmitsNone):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_OmitsNone):
    """One piece of a streamed call: the first has ``id``, ``type`` and the name, later ones argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaAudio(_OmitsNone):
    """A piece of a streamed spoken reply (``ChoiceDeltaAudio``): the id once, then transcript text and base64
    audio as each comes, and ``expires_at`` last. Clients concatenate each field, as the openai helpers do."""

    id: str | None = None
    data: str | None = None
    expires_at: int | None = None
    transcript: str | None = None


class DeltaMessage(_OmitsNone):
    _keep = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    audio: DeltaAudio | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs layout (parallel lists)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
