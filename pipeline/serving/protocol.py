"""The OpenAI API's request and response bodies, as far as the server honours them, and its error shape.

Fields the server honours are validated here, with OpenAI's ranges (a value out of range is a 400 naming the
field). Fields it does not implement are refused when they ask for something (a penalty, logprobs, echo, tools),
rather than silently ignored; the ones clients send by default with neutral values pass, and the OpenAPI schema
declares just those values. Any other field is ignored, as OpenAI-compatible servers do. Types are strict, as
OpenAI's are: `"n": "2"` or `"stream": "yes"` is a 400, not coerced (an integral number such as 2.0 is an integer,
as JSON Schema has it). Text must be valid Unicode: JSON can spell a lone surrogate (`"\\ud800"`), which no
tokenizer can encode.

The response models (`ChatCompletion`, `Completion`, their stream chunks, `ModelList`, `Health`, `ErrorResponse`)
are what the app's OpenAPI schema declares for each status: tests/test_serve_fuzz.py checks every answer against
them, streams event by event.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError

MAX_N = 16
MAX_CHOICES = 64  # prompts x n of one request: a bigger one is refused, not queued for minutes
MAX_STOPS = 4
MAX_BODY_BYTES = 1 << 20  # a bigger request body is a 413 before it is read (tokenizing 1 MiB takes ~1 s of CPU)
MAX_SEED = 2**53 - 1  # JSON's safe integers (JavaScript's Number.MAX_SAFE_INTEGER); torch.Generator takes 64 bits


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode: {err.reason} at character {err.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
Stop = Annotated[str, Field(min_length=1), AfterValidator(_unicode)]
STRICT = ConfigDict(extra="ignore", strict=True)
INTEGERS = frozenset({"max_tokens", "n", "seed", "best_of"})


class APIError(Exception):
    """An error a request earns: its HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def only(*values: object) -> dict:
    """The JSON schema of a field the server does not implement: the neutral values it accepts."""
    return {"json_schema_extra": {"enum": list(values), "description": "not supported: only " +
                                  " or ".join(map(json.dumps, values))}}


def unsupported(message: str) -> PydanticCustomError:
    """A refusal of what the server does not implement (OpenAI's code for it: the error's `code`)."""
    return PydanticCustomError("unsupported_value", message)


class Sampling(BaseModel):
    """What both endpoints share: the model, the sampling settings, stops, n, seed, streaming."""

    model_config = STRICT

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Stop | list[Stop] | None = Field(None, validate_default=True,  # a list after validation
                                           json_schema_extra={"maxItems": MAX_STOPS})
    seed: int | None = Field(None, ge=-MAX_SEED, le=MAX_SEED)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = Field(0.0, **only(0))
    frequency_penalty: float = Field(0.0, **only(0))
    logprobs: bool | None = Field(None, **only(None, False))

    @model_validator(mode="before")
    @classmethod
    def _integral(cls, data: object) -> object:
        """An integral number (2.0) where an integer is due is that integer, as JSON Schema has it."""
        if not isinstance(data, dict):
            return data
        return {k: int(v) if k in INTEGERS and isinstance(v, float) and v.is_integer() else v for k, v in data.items()}

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        return stops

    @field_validator("presence_penalty", "frequency_penalty", "logprobs")
    @classmethod
    def _unsupported(cls, v: float | bool | None, info: ValidationInfo) -> float | bool | None:
        if v:
            raise unsupported(f"{info.field_name} is not supported by this server: leave it "
                              f"{'0' if 'penalty' in info.field_name else 'unset'}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0, "description": "not supported: only "
                                                                                             "null or []"})

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list | None) -> list | None:
        if v:
            raise unsupported("tools are not supported by this server")
        return v

    def conversation(self) -> list[dict]:
        """The messages as the chat template takes them (a developer message is a system message)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(Sampling):
    # a list's length is bounded here, not by Field(max_length), which would bound a string's characters too
    prompt: Text | list[Text] = Field(json_schema_extra={"minItems": 1, "maxItems": MAX_CHOICES})
    echo: bool = Field(False, **only(False))
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="not supported: only null or equal to n")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and len(v) > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} prompts, got {len(v)}")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise unsupported("echo is not supported by this server")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v != info.data.get("n", 1):
            raise unsupported("best_of is not supported by this server (other than equal to n)")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


# ---------------------------------------------------------------- what the server answers


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every 4xx and 5xx has this body (a failure mid-stream sends it as an event)."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class Head(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: None


Finish = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int = Field(ge=0)
    message: AssistantMessage
    finish_reason: Finish
    logprobs: None


class ChatCompletion(Head):
    object: Literal["chat.completion"]
    choices: list[ChatChoice] = Field(min_length=1)
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = Field(ge=0)
    delta: Delta
    finish_reason: Finish | None
    logprobs: None


class ChatCompletionChunk(Head):
    """An event of a chat stream: a choice's delta, or (`stream_options.include_usage`) the usage, no choices."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice] = Field(max_length=1)
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = Field(ge=0)
    text: str
    finish_reason: Finish
    logprobs: None


class Completion(Head):
    object: Literal["text_completion"]
    choices: list[CompletionChoice] = Field(min_length=1)
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int = Field(ge=0)
    text: str
    finish_reason: Finish | None
    logprobs: None


class CompletionChunk(Head):
    """An event of a completion stream (OpenAI names its object "text_completion" too)."""

    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice] = Field(max_length=1)
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int = Field(ge=1)


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    default_model: str
    models: list[str]
    pending: int = Field(ge=0)
    waves: int = Field(ge=0)
    widest_wave: int = Field(ge=0)
    cancelled: int = Field(ge=0)


FIELDS = frozenset(name for m in (ChatRequest, CompletionRequest, Message, TextPart) for name in m.model_fields)


def field_path(loc: tuple) -> str | None:
    """The request field a validation error's `loc` names ("messages.0.content"), without FastAPI's "body" and
    pydantic's union members ("str", "list[str]")."""
    return ".".join(str(p) for p in loc if isinstance(p, int) or p in FIELDS) or None


def streamed(chunk: type[BaseModel]) -> dict:
    """The OpenAPI content of a stream of `chunk`s: server-sent events, each `data:` a chunk, an error, or [DONE]
    (OpenAPI 3.2's `itemSchema`, which schemathesis checks event by event)."""
    data = {"anyOf": [{"const": "[DONE]"}, {"contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": f"#/components/schemas/{chunk.__name__}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}}]}
    return {"text/event-stream": {"itemSchema": {"type": "object", "required": ["data"],
                                                 "properties": {"data": data}}}}


def declare(schema: dict, models: list[str], context: int) -> dict:
    """FastAPI's OpenAPI `schema` told what only the running server knows: `model` is one of `models`, and
    `max_tokens` at most `context` (the largest of theirs); without FastAPI's 422, which this server never sends
    (a bad request is a 400, as from OpenAI); with the stream chunks' schemas that `streamed` refers to."""
    parts = schema["components"]["schemas"]
    for name in ("ChatRequest", "CompletionRequest"):
        fields = parts[name]["properties"]
        fields["model"]["enum"] = models
        for option in fields["max_tokens"]["anyOf"]:
            if option.get("type") == "integer":
                option["maximum"] = context
    for operations in schema["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        parts.pop(name, None)
    _, chunks = models_json_schema([(m, "serialization") for m in (ChatCompletionChunk, CompletionChunk)],
                                   ref_template="#/components/schemas/{model}")
    parts.update(chunks["$defs"])
    return schema
