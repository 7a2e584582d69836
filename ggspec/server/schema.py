"""Request bodies of the OpenAI-compatible API, validated by pydantic.

Types are strict (a string is not a number). Parameters that ggspec does not implement
are refused with a message naming them, unless they ask for what ggspec does anyway
(`n: 1`, `logprobs: false`, a zero penalty, ...), which some clients always send.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..config import METHODS

MAX_STOPS = 16

# parameter -> (the values ggspec accepts, why others are refused)
_UNSUPPORTED = {
    "n": ((None, 1), "only n=1 is supported: one answer per request"),
    "best_of": ((None, 1), "only best_of=1 is supported"),
    "logprobs": ((None, False, 0), "log probabilities are not returned"),
    "top_logprobs": ((None, 0), "log probabilities are not returned"),
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None, ""), "suffix (fill-in-the-middle) is not supported"),
    "presence_penalty": ((None, 0), "penalties would change the target's distribution; only 0 is supported"),
    "frequency_penalty": ((None, 0), "penalties would change the target's distribution; only 0 is supported"),
    "repeat_penalty": ((None, 1), "penalties would change the target's distribution; only 1 is supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "parallel_tool_calls": ((None, False), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "response_format": ((None, {"type": "text"}), "only the text response format is supported"),
}


CONFLICT = "conflict"  # the kind of error of a check across a request's fields


def _error(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content: Any) -> str:
        """A string, or a list of text parts ({"type": "text", "text": ...}) joined."""
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise _error("content_part", f"only text content parts are supported, got {kind!r}")
                texts.append(part["text"])
            return "".join(texts)
        raise _error("content_type", "content must be a string or a list of text parts")


class GenerationRequest(_Strict):
    """What both endpoints take: sampling, length, stops, streaming, and ggspec's own
    `method`, `draft_max` and `draft_p_min` (the server's defaults where absent)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    seed: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None  # llama.cpp server's extension: generate to the length or a stop
    cache_prompt: bool = True  # llama.cpp server's too: false computes the whole prompt afresh
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for abuse tracking: accepted, unused
    method: Literal[METHODS] | None = None  # type: ignore[valid-type]
    draft_max: int | None = Field(None, ge=1, le=64)
    draft_p_min: float | None = Field(None, ge=0, lt=1)
    # accepted only with the values that change nothing (see _UNSUPPORTED)
    n: int | None = None
    best_of: int | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None
    logit_bias: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _supported(cls, value: Any, info: ValidationInfo) -> Any:
        allowed, why = _UNSUPPORTED[info.field_name]
        if value not in allowed:
            raise _error("unsupported", why)
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and (len(stop) > MAX_STOPS or "" in stop) or stop == "":
            raise _error("stop", f"at most {MAX_STOPS} non-empty strings")
        return stop

    @model_validator(mode="after")
    def _one_length(self) -> GenerationRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise _error(CONFLICT, "give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def length(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    prompt: str | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        """A string, a list holding one string, or a list of token ids."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        if isinstance(prompt, str) or isinstance(prompt, list) and all(type(t) is int for t in prompt):
            return prompt
        if isinstance(prompt, list) and all(isinstance(p, list | str) for p in prompt):
            raise _error("batch", "send one prompt per request (a string or a list of token ids); "
                                  "batches of prompts are not supported")
        raise _error("prompt", "the prompt must be a string or a list of token ids")
