"""Chat sessions: the conversation, its settings, and multi-turn KV reuse.

Each turn sends the whole conversation, rendered with the target's chat template. The
engine keeps the longest token prefix that its KV caches (target and draft) already hold,
so a turn prefills only what is new: the end of the last answer and the new user message.
A session saves to one file with the engine's state (ggspec.session) and resumes from it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Generator, Sequence

from .config import SamplingConfig, SpecConfig
from . import session
from .engine import Engine, Result, consume
from .errors import GgspecError
from .stats import Stats

# what /set changes: SamplingConfig and SpecConfig fields that apply per answer, and max_tokens
NAMES = ("temperature", "top_k", "top_p", "min_p", "seed", "ignore_eos", "method", "draft_max", "draft_p_min",
         "max_tokens")
ALIASES = {"t": "temperature", "temp": "temperature", "k": "draft_max", "n": "max_tokens"}


@dataclass(frozen=True)
class Settings:
    """What the next answer uses; `/set NAME VALUE` replaces one field."""

    sampling: SamplingConfig
    spec: SpecConfig
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")

    def describe(self) -> str:
        values = {**asdict(self.sampling), **asdict(self.spec), "max_tokens": self.max_tokens}
        return ", ".join(f"{k} {'none' if values[k] is None else values[k]}" for k in NAMES)

    def with_value(self, name: str, text: str) -> Settings:
        """A copy with `name` set from the user's `text`; ValueError names what is wrong."""
        name = ALIASES.get(name, name).replace("-", "_")
        if name not in NAMES:
            raise ValueError(f"unknown setting {name!r}; settings: {', '.join(NAMES)}")
        if name == "max_tokens":
            return replace(self, max_tokens=_parse(name, text, "int"))
        for config, attr in ((self.sampling, "sampling"), (self.spec, "spec")):
            types = {f.name: f.type for f in fields(config)}
            if name in types:
                value = _parse(name, text, types[name])
                return replace(self, **{attr: replace(config, **{name: value})})
        raise AssertionError(f"{name} is in NAMES but in no config")


def _parse(name: str, text: str, kind: str) -> object:
    """`text` as a value of the dataclass field type `kind` ("int", "float | None", ...)."""
    if kind.endswith(" | None") and text.lower() == "none":
        return None
    kind = kind.removesuffix(" | None")
    try:
        return {"int": int, "float": float, "bool": _switch}.get(kind, str)(text)
    except ValueError:
        raise ValueError(f"{name} needs a value like {_EXAMPLES.get(name, kind)}, got {text!r}") from None


def _switch(text: str) -> bool:
    """on / off (also true / false, yes / no, 1 / 0)."""
    value = {"on": True, "true": True, "yes": True, "1": True,
             "off": False, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise ValueError(text)
    return value


_EXAMPLES = {"temperature": "0.7", "top_k": "40", "top_p": "0.95", "min_p": "0.05", "seed": "42 or none",
             "ignore_eos": "on or off",
             "draft_max": "4", "draft_p_min": "0.75", "max_tokens": "512"}


def refuse_draft_only(method: str, given: Sequence[str], use: str) -> None:
    """Refuse the options of the draft model's rounds that were given (`given`, by the
    names the user knows them by) with another method than draft; `use` says how to ask
    for method draft (the command line and the server share this check)."""
    if given and method != "draft":
        raise GgspecError(f"{given[0]} applies to the draft model's rounds, not to method {method}: {use}")


def available_methods(engine: Engine) -> list[str]:
    """The speculation methods this engine can run now."""
    return ["none", *engine.drafters]


class ChatSession:
    """A conversation with an engine: system prompt, messages, settings and stats.

    Answers are kept when they are cut short (Ctrl-C, max_tokens): the next turn
    continues the conversation as it was shown.
    """

    def __init__(self, engine: Engine, settings: Settings, *, system: str | None = None):
        self.engine = engine
        self.settings = settings
        self.system = system
        self.messages: list[dict] = []  # user and assistant turns, without the system prompt
        self.last: Stats | None = None   # the last answer's stats
        self.total: Stats | None = None  # summed over the session

    def set(self, name: str, text: str) -> Settings:
        """Change one setting (see Settings.with_value); refuse a method this engine lacks."""
        settings = self.settings.with_value(name, text)
        if settings.spec.method not in available_methods(self.engine):
            raise ValueError(f"method {settings.spec.method!r} is not available here; "
                             f"available: {', '.join(available_methods(self.engine))}")
        self.settings = settings
        return settings

    def reset(self) -> None:
        """Forget the conversation (the system prompt and the settings stay)."""
        self.messages = []

    def conversation(self, text: str) -> list[dict]:
        """The messages sent for a new user message `text`."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.messages, {"role": "user", "content": text}]

    def stream(self, text: str) -> Generator[str, None, Result]:
        """Answer `text`: yield pieces of the answer as they are committed, return the
        Result. What was generated joins the conversation even if the answer is cut short
        (the caller closes the generator, or KeyboardInterrupt); a turn that fails before
        its first piece (say, it does not fit in the context) is not kept."""
        s = self.settings
        gen = self.engine.stream(self.conversation(text), max_tokens=s.max_tokens,
                                 sampling=s.sampling, spec=s.spec)
        pieces: list[str] = []
        result: Result | None = None
        try:
            while True:
                try:
                    piece = next(gen)
                except StopIteration as done:
                    result = done.value
                    break
                pieces.append(piece)
                yield piece
        finally:
            gen.close()
            if result is not None or pieces:
                answer = result.text if result is not None else "".join(pieces)
                self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
            if result is not None:
                self.last = result.stats
                self.total = result.stats if self.total is None else self.total + result.stats
        return result

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> Result:
        """Answer `text` (see stream); on_text receives each piece."""
        return consume(self.stream(text), on_text or (lambda piece: None))

    def save(self, path: str | os.PathLike) -> None:
        """Save the conversation, its settings and stats with the engine's state to one
        file, atomically (ggspec.session)."""
        chat = {"system": self.system, "messages": self.messages, "max_tokens": self.settings.max_tokens,
                "sampling": asdict(self.settings.sampling), "spec": asdict(self.settings.spec),
                "last": None if self.last is None else asdict(self.last),
                "total": None if self.total is None else asdict(self.total)}
        session.save(self.engine, path, chat)

    def load(self, path: str | os.PathLike) -> None:
        """Go on with the session saved in `path`: its conversation, settings and stats,
        and the engine's caches and estimates as they were. SessionFileError, with this
        session and the engine unchanged, when the file does not fit them."""
        saved = session.load(self.engine, path, self._restored)
        self.system, self.messages, self.settings = saved.system, saved.messages, saved.settings
        self.last, self.total = saved.last, saved.total

    def _restored(self, chat: dict) -> ChatSession:
        """A session on this engine from saved chat data; KeyError, TypeError or ValueError
        where it does not fit."""
        settings = Settings(SamplingConfig(**chat["sampling"]), SpecConfig(**chat["spec"]), chat["max_tokens"])
        if settings.spec.method not in available_methods(self.engine):
            raise ValueError(f"method {settings.spec.method!r} is not available here")
        if chat["system"] is not None and not isinstance(chat["system"], str):
            raise TypeError("the system prompt is not text")
        saved = ChatSession(self.engine, settings, system=chat["system"])
        saved.messages = [{"role": m["role"], "content": m["content"]} for m in chat["messages"]]
        if any(m["role"] not in ("user", "assistant") or not isinstance(m["content"], str) for m in saved.messages):
            raise ValueError("messages other than user and assistant text")
        saved.last, saved.total = (None if chat[k] is None else Stats(**chat[k]) for k in ("last", "total"))
        return saved
