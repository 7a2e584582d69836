"""Response bodies in the OpenAI schema, with llama.cpp's `timings` and ggspec's stats.

Every answer carries `usage`; the whole answer (or the last chunk of a stream) also
carries `timings` (the fields of llama.cpp's server) and `ggspec` (the generation's
Stats, queue time and time to first token). A streamed text chunk tells in
`ggspec.from_draft` whether its text came from accepted draft tokens, and in
`ggspec.tokens` how many tokens the answer has with it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..engine import Piece, Result
from ..stats import Stats
from .worker import Job

ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


def error_body(message: str, status: int = 400, param: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def sse(data: dict | str) -> str:
    """One Server-Sent Event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def usage(s: Stats) -> dict:
    prompt = s.prefill_tokens + s.cached_tokens
    return {"prompt_tokens": prompt, "completion_tokens": s.generated_tokens,
            "total_tokens": prompt + s.generated_tokens, "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}


def timings(s: Stats) -> dict:
    """llama.cpp server's `timings`: prompt_n counts the prompt tokens evaluated, cache_n those reused."""
    prompt_ms, predicted_ms = 1000 * s.prefill_seconds, 1000 * s.decode_seconds
    return {"cache_n": s.cached_tokens, "prompt_n": s.prefill_tokens, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / s.prefill_tokens if s.prefill_tokens else 0.0,
            "prompt_per_second": s.prefill_tokens / s.prefill_seconds if s.prefill_seconds else 0.0,
            "predicted_n": s.generated_tokens, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / s.generated_tokens if s.generated_tokens else 0.0,
            "predicted_per_second": s.decode_tokens_per_second,
            "draft_n": s.draft_tokens, "draft_n_accepted": s.accepted_tokens}


def ggspec_stats(job: Job, result: Result) -> dict:
    return {**result.stats.to_dict(), "queue_seconds": job.queue_seconds,
            "first_token_seconds": job.first_token_seconds}


@dataclass(frozen=True)
class Reply:
    """The bodies of one answer: a chat completion (chat=True) or a text completion."""

    chat: bool
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, chunk: bool) -> dict:
        if self.chat:
            kind, prefix = ("chat.completion.chunk" if chunk else "chat.completion"), "chatcmpl-"
        else:
            kind, prefix = "text_completion", "cmpl-"
        return {"id": prefix + self.id, "object": kind, "created": self.created, "model": self.model}

    def _text(self, text: str, chunk: bool) -> dict:
        if not self.chat:
            return {"text": text}
        return {"delta": {"content": text}} if chunk else {"message": {"role": "assistant", "content": text}}

    def whole(self, job: Job, result: Result) -> dict:
        choice = {"index": 0, **self._text(result.text, False), "logprobs": None,
                  "finish_reason": result.finish_reason}
        return {**self._head(False), "choices": [choice], "usage": usage(result.stats),
                "timings": timings(result.stats), "ggspec": ggspec_stats(job, result)}

    def opening(self) -> dict | None:
        """A chat stream opens with the assistant's role."""
        if not self.chat:
            return None
        return {**self._head(True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]}

    def piece(self, piece: Piece) -> dict:
        return {**self._head(True), "choices": [{"index": 0, **self._text(piece, True), "logprobs": None,
                                                 "finish_reason": None}],
                "ggspec": {"from_draft": piece.from_draft, "tokens": piece.tokens}}

    def closing(self, job: Job, result: Result) -> dict:
        """The last chunk: the finish reason, timings and stats."""
        end = {"delta": {}} if self.chat else {"text": ""}
        return {**self._head(True), "choices": [{"index": 0, **end, "logprobs": None,
                                                 "finish_reason": result.finish_reason}],
                "timings": timings(result.stats), "ggspec": ggspec_stats(job, result)}

    def usage(self, result: Result) -> dict:
        """The chunk that stream_options.include_usage asks for: no choices, the usage."""
        return {**self._head(True), "choices": [], "usage": usage(result.stats)}
