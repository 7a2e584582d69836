"""The interactive chat of `ggspec chat`: a read-eval-print loop in a terminal, or one
user message per line of piped stdin.

Answers stream to stdout; footers, stats and command output go through `say` (stderr
when piped, so that stdout carries only the answers).
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import click

from .chat import ChatSession
from .engine import Engine, Piece
from .config import SpecConfig
from .errors import ContextOverflowError, GgspecError
from .stats import footer, report

CHAT_HELP = '''\
/help              this list
/reset             forget the conversation (the system prompt and settings stay)
/stats             full stats of the last answer and of the session
/system [TEXT]     set the system prompt; without TEXT, remove it
/set [NAME VALUE]  change a setting; without NAME, show them. Names: temperature (t),
                   top_k, top_p, min_p, seed, ignore_eos (on/off), max_tokens (n),
                   method, draft_max (k), draft_p_min
/save FILE         save the conversation, settings and KV caches to FILE
/load FILE         go on with a conversation saved with /save (same models)
/exit              leave (also Ctrl-D, or Ctrl-C at the prompt)
""" ... """        a message of several lines
Ctrl-C during an answer stops it and keeps what was written.'''


@contextmanager
def interrupt_cancels(engine: Engine) -> Iterator[None]:
    """While generating, the first Ctrl-C asks the engine to stop after its current round
    (what was generated is kept); a second one interrupts as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT) or signal.default_int_handler

    def on_interrupt(signum, frame) -> None:
        engine.cancel()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def repl(session: ChatSession, show_drafts: bool) -> None:
    """Read messages and /commands at a `>>>` prompt until /exit, Ctrl-D or Ctrl-C."""
    try:
        import readline  # noqa: F401  (gives input() line editing and history)
    except ImportError:
        pass

    engine = session.engine
    draft = f" + {engine.draft.path.name}" if engine.draft else ""
    spec = session.settings.spec
    k = f", k={spec.draft_max}" if spec.method != "none" else ""
    click.secho(f"ggspec chat: {engine.target.path.name}{draft} ({spec.method}{k}). "
                "/help for commands, Ctrl-D to exit.", dim=True)
    threading.Thread(target=_prepare, args=(engine, spec), name="ggspec-prepare", daemon=True).start()
    while True:
        try:
            line = _read_message()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not _command(session, line, click.echo):
                    return
                continue
            _answer(session, line, show_drafts, click.echo)
        except (GgspecError, ValueError) as e:
            click.secho(f"Error: {e}", fg="red")
            continue


def _prepare(engine: Engine, spec: SpecConfig) -> None:
    """Measure what the first answer would measure first while its message is typed."""
    try:
        engine.prepare(spec)
    except GgspecError:  # the chat ended first (EngineClosedError), or the first answer will say what failed
        pass


def _read_message() -> str:
    """One line, or several between triple quotes."""
    line = input(">>> ").strip()
    if not line.startswith('"""'):
        return line
    text = line[3:]
    while not text.endswith('"""'):
        text += "\n" + input("... ")
    return text[:-3].strip()


def piped(session: ChatSession) -> bool:
    """One user message (or /command) per line of stdin; only the answers go to stdout.
    A line that fails (a bad command, a conversation grown past the context) is reported
    on stderr and the lines after it still run; False when one failed."""
    def say(text: str) -> None:  # stdout carries only the answers
        click.echo(text, err=True)

    ok = True
    sys.stdin.reconfigure(errors="surrogateescape")  # (a line that is not UTF-8 is refused, not the rest)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not _command(session, line, say):
                    break
                continue
            _answer(session, line, False, say)
        except (GgspecError, ValueError) as e:
            click.secho(f"Error: {e}", fg="red", err=True)
            ok = False
    return ok


def _answer(session: ChatSession, text: str, show_drafts: bool, say: Callable[[str], None]) -> None:
    """Stream one answer to stdout (accepted draft tokens in cyan with show_drafts), then its footer."""

    def show(piece: Piece) -> None:
        draft = show_drafts and piece.from_draft
        click.echo(click.style(piece, fg="cyan") if draft else piece, nl=False)

    try:
        with interrupt_cancels(session.engine):
            result = session.ask(text, on_text=show)
    except ContextOverflowError as e:  # (no shorter prompt to give in a chat)
        raise ContextOverflowError(f"{e}; /reset starts a new conversation") from None
    except KeyboardInterrupt:
        click.echo()
        say(click.style("[interrupted]", dim=True))
        return
    click.echo()
    if result.finish_reason == "cancelled":
        say(click.style("[interrupted]", dim=True))
    say(click.style(footer(result.stats), dim=True))


def _command(session: ChatSession, line: str, say: Callable[[str], None]) -> bool:
    """Run one slash command; False means leave the chat."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("exit", "quit", "bye"):
        return False
    if name == "help":
        say(CHAT_HELP)
    elif name == "reset":
        session.reset()
        say("conversation cleared")
    elif name == "stats":
        if session.last is None:
            say("no answer yet")
        else:
            say(f"last answer\n{_indent(report(session.last))}\nsession\n{_indent(report(session.total))}")
    elif name == "system":
        session.system = arg or None
        say(f"system prompt set: {arg}" if arg else "system prompt removed")
    elif name == "set":
        key, _, value = arg.partition(" ")
        if not key:
            say(session.settings.describe())
        elif not value.strip():
            raise ValueError("usage: /set NAME VALUE, e.g. /set temperature 0.7")
        else:
            session.set(key, value.strip())
            say(session.settings.describe())
    elif name in ("save", "load"):
        if not arg:
            raise ValueError(f"usage: /{name} FILE")
        if name == "save":
            session.save(arg)
            say(f"saved to {arg}: {contents(session)}")
        else:
            session.load(arg)
            say(f"loaded {arg}: {contents(session)}; {session.settings.describe()}")
    else:
        say(f"unknown command /{name}; /help lists the commands")
    return True


def contents(session: ChatSession) -> str:
    """What a saved or loaded chat holds, in a few words."""
    turns = sum(m["role"] == "user" for m in session.messages)
    return f"{turns} turn{'' if turns == 1 else 's'}"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
