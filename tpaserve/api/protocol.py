"""OpenAI (and vLLM-extension) request and response bodies, as pydantic models.

Requests check shapes and types only; the values of the generation knobs are checked once,
by SamplingParams (its errors name the OpenAI field). Every field of OpenAI's schemas is
declared, null meaning its default; fields that do nothing for a base model are marked "no
effect". Unknown fields pass validation and are then refused or dropped, with a warning, by
request_policy.screen (docs/api.md has the table).

Requests are validated strictly: pydantic's lax mode would take `true` for n = 1, "3" for
max_tokens = 3 and 2.0 for an integer, so a client's type error would run as some other
request. The value ranges SamplingParams enforces are also written into the OpenAPI schema
(`_doc`, documentation only); the fuzz tests check that the two agree.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from tpaserve.models.chat_template import ALLOWED_ROLES
from tpaserve.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_PENALTY,
    MAX_TEMPERATURE,
    REPETITION_PENALTY_RANGE,
    SEED_RANGE,
    SamplingParams,
)

# ---------------------------------------------------------------------------------- requests


def _doc(default: Any = None, **schema: Any) -> Any:
    """A field whose JSON schema states `schema` (e.g. minimum) without pydantic enforcing
    it: SamplingParams checks the value, once, with a message that names the field."""
    return Field(default, json_schema_extra=schema)


def _has_lone_surrogate(v: Any) -> bool:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(v, list):
        return any(_has_lone_surrogate(x) for x in v)
    if isinstance(v, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(x) for k, x in v.items())
    return False


class _Request(BaseModel):
    """Base of every request body: strict types (see above), and text that is Unicode."""
    # strict types; unknown fields are kept aside for request_policy.screen, which refuses
    # or drops them (vLLM's policy), so they never reach the engine or a template
    model_config = ConfigDict(strict=True, extra="allow")

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        # JSON may escape half a surrogate pair ("\ud800"); Python keeps it in the str, and
        # the tokenizers cannot encode it (sentencepiece raised: a 500).
        if _has_lone_surrogate(v):
            raise ValueError("contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is "
                             "not valid Unicode text")
        return v


class StreamOptions(_Request):
    include_usage: bool | None = None            # a last chunk with the usage
    continuous_usage_stats: bool | None = None   # vLLM: the usage so far in every chunk
    include_obfuscation: bool | None = None      # no effect: there is no padding to add


class SamplingRequest(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions. None means the default."""
    model: str | None = None
    n: int | None = _doc(minimum=1, maximum=MAX_N)
    temperature: float | None = _doc(minimum=0, maximum=MAX_TEMPERATURE)
    top_p: float | None = _doc(exclusiveMinimum=0, maximum=1)
    top_k: int | None = _doc(minimum=-1)
    min_p: float | None = _doc(minimum=0, maximum=1)
    seed: int | None = _doc(minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = _doc(items={"type": "integer", "minimum": 0})
    presence_penalty: float | None = _doc(minimum=-MAX_PENALTY, maximum=MAX_PENALTY)
    frequency_penalty: float | None = _doc(minimum=-MAX_PENALTY, maximum=MAX_PENALTY)
    repetition_penalty: float | None = _doc(minimum=REPETITION_PENALTY_RANGE[0],
                                            maximum=REPETITION_PENALTY_RANGE[1])
    logit_bias: dict[str, float] | None = _doc(additionalProperties={
        "type": "number", "minimum": -MAX_LOGIT_BIAS, "maximum": MAX_LOGIT_BIAS})
    min_tokens: int | None = _doc(minimum=0)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    spaces_between_special_tokens: bool | None = None   # no effect (docs/api.md)
    truncate_prompt_tokens: int | None = _doc(minimum=-1)
    prompt_logprobs: int | None = _doc(minimum=0, maximum=MAX_LOGPROBS)
    return_tokens_as_token_ids: bool | None = None
    user: str | None = None                      # no effect
    # vLLM's: lower runs first; only with --scheduling-policy priority (fcfs: 400 unless 0)
    priority: int | None = _doc(0, minimum=-2**31, maximum=2**31 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # structured outputs, checked and mapped in api/structured.py (at most one of these)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # no effect: llguidance is the one backend

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """Raises SamplingParamsError (-> 400 naming the field) on a bad value."""
        given = {k: getattr(self, k) for k in (
            "n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
            "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
            "min_tokens", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output")}
        given = {k: v for k, v in given.items() if v is not None}
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, **given)


PromptInput = str | list[str] | list[int] | list[list[int]]


_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}


class CompletionRequest(SamplingRequest):
    prompt: Any = Field(description="a string, a list of strings, a list of token ids or a "
                                    "list of token-id lists; none of them empty",
                        json_schema_extra={"anyOf": [
                            {"type": "string", "minLength": 1},
                            {"type": "array", "minItems": 1,
                             "items": {"type": "string", "minLength": 1}},
                            _TOKEN_IDS,
                            {"type": "array", "minItems": 1, "items": _TOKEN_IDS}]})
    max_tokens: int | None = _doc(16, minimum=0)
    echo: bool | None = False
    logprobs: int | None = _doc(minimum=0, maximum=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool | None = None       # None: True

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, v: Any) -> PromptInput:
        # Checked by hand: a union of four list types gives pydantic errors no one can read.
        # Empty text is refused like empty ids, though the tokenizer would add a BOS to it:
        # a request with nothing to continue is a client bug, not a prompt.
        def ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x)
        if isinstance(v, str) and v:
            return v
        if isinstance(v, list) and v:
            if all(isinstance(p, str) and p for p in v) or ids(v) or all(ids(p) for p in v):
                return v
        raise ValueError("must be a non-empty string, a non-empty list of non-empty strings, "
                         "a non-empty list of token ids, or a non-empty list of non-empty "
                         "token-id lists")


class ChatMessage(_Request):
    """Any message OpenAI's schema allows, so a client can send back its own response
    objects (message.model_dump()). Everything but role and content goes to the chat
    template as is (templates that know tool calls render them)."""
    role: str = Field(json_schema_extra={"enum": sorted(ALLOWED_ROLES)})  # the template checks
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    annotations: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None         # vLLM's responses carry it


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = _doc(minimum=0)
    max_completion_tokens: int | None = _doc(minimum=0)
    logprobs: bool | None = False
    top_logprobs: int | None = _doc(minimum=0, maximum=MAX_LOGPROBS)
    add_generation_prompt: bool | None = None    # None: True
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool | None = None       # None: add BOS unless the template did
    # tools: only with tool_choice "none" (request_policy.check_tools)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None      # no effect (no tool calls)
    # OpenAI's fields that mean nothing for a base model served here: no effect
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    reasoning_effort: str | None = None
    include_reasoning: bool | None = None        # vLLM
    verbosity: str | None = None
    prediction: dict[str, Any] | None = None     # a latency hint: output is the same
    # OpenAI's fields a text-only base model cannot honour: refused unless neutral
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None


class TokenizeRequest(_Request):
    """vLLM's /tokenize: either `prompt` (text) or `messages` (rendered by the chat template)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None       # prompt: default True; messages: see chat
    add_generation_prompt: bool | None = None    # None: True
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(json_schema_extra={"items": {"type": "integer", "minimum": 0}})


# --------------------------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt: int, completion: int) -> UsageInfo:
        return cls(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion)


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists, one entry per token."""
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    def extend(self, more: "CompletionLogprobs") -> "CompletionLogprobs":
        """Append another run of tokens (offsets already continue); returns self."""
        self.tokens += more.tokens
        self.token_logprobs += more.token_logprobs
        self.top_logprobs += more.top_logprobs
        self.text_offset += more.text_offset
        return self


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry: one per token id (the prompt's token and the top ones);
    rank is 1 for the most likely token, null when the token is outside the top ones."""
    logprob: float
    rank: int | None = None
    decoded_token: str


# vLLM's prompt_logprobs: per prompt position (the first has no context: null), token id ->
# its entry
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(BaseModel):
    """Serialised without its unset keys: OpenAI's deltas carry only what changed."""
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tpaserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


# ------------------------------------------------------------------------ errors and streams


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")     # the schema says: exactly these keys
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, the body of every non-2xx response (rendered by errors.py)."""
    model_config = ConfigDict(extra="forbid")
    error: ErrorInfo


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with every `$ref` replaced by its definition (these models are
    not recursive), so it can sit inside an OpenAPI document whose components lack them."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(schema)


def sse_response(chunk: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `content` entry of a `stream: true` response: one event per engine step whose
    data is a `chunk` (JSON), or an error body once the stream had started, and last the
    literal `[DONE]`. OpenAPI 3.2's itemSchema describes one event."""
    data = {"anyOf": [
        {"type": "string", "contentMediaType": "application/json",
         "contentSchema": {"anyOf": [_inline_refs(chunk.model_json_schema()),
                                     _inline_refs(ErrorResponse.model_json_schema())]}},
        {"type": "string", "const": "[DONE]"}]}
    return {"text/event-stream": {"itemSchema": {
        "type": "object", "required": ["data"],
        "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"},
                       "retry": {"type": "integer", "minimum": 0}}}}}
