"""The ggspec command line: run, chat, serve, bench, pull, models, info, convert, train.

With the chat REPL (repl.py), the only module that prints. A user mistake (GgspecError
or ValueError) ends as one `Error: ...` line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import os
import socket
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import click
from click.core import ParameterSource
from tqdm import tqdm

from . import __version__, bench as benchmark, hub, machine
from .backend import Model, check_vocab_compatible, default_threads, serve_rpc, set_verbose
from .chat import NAMES, ChatSession, Settings, available_methods, refuse_draft_only
from .config import DRAFT_P_MIN, MAX_DRAFT, METHODS, BackendConfig, SamplingConfig, SpecConfig, rpc_endpoint
from .engine import DEFAULT, MEDUSA_MAX_NODES, Engine, Result
from .heads.eagle_paths import BACKENDS as EAGLE_BACKENDS
from .errors import GgspecError
from .heads.collect import CollectConfig
from .heads.report import format_eagle_report, format_report
from .native import MODES as NATIVE_MODES, LlamaCpp, check_dir
from .repl import contents, interrupt_cancels, piped, repl
from .stats import footer
from .text import utf8
from .tree import TREE_SHAPES

_SAMPLING = SamplingConfig()
_SPEC = SpecConfig()


class _Group(click.Group):
    """Turns user mistakes raised by any command into one line and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (GgspecError, ValueError) as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  ggspec chat                                   chat with the default pair (pulled on first use)
  ggspec run "Write a Python function that reverses a string."
  ggspec run -t 0 -k 6 --method lookup -f prompt.txt
  echo "Explain recursion." | ggspec run --json
  ggspec run -m model.gguf -d draft.gguf --raw "def fib(n):"
  ggspec serve --port 8080                      OpenAI-compatible API and chat page on 127.0.0.1
  ggspec bench -w code -w edit --method draft --method lookup -k 2 -k 4
  ggspec bench -w edit --native llama.cpp-bin   also llama.cpp's own tools, side by side
  ggspec pull && ggspec models
  ggspec info model.gguf --draft draft.gguf
  ggspec convert eagle ./EAGLE3-checkpoint eagle.gguf -m model.gguf
  ggspec train eagle model.gguf --prompts prompts.txt -o eagle.gguf
  ggspec rpc-server --host 192.168.1.7         on another machine; then, here:
  ggspec run --rpc 192.168.1.7:50052 "Explain recursion."
""")
@click.version_option(__version__, "-V", "--version", prog_name="ggspec")
def cli() -> None:
    """Exact speculative decoding for local GGUF models."""


def _endpoints(ctx, param, value: str | None) -> tuple[str, ...]:
    """--rpc a:1,b:2 -> ("a:1", "b:2")."""
    try:
        return tuple(rpc_endpoint(v) for v in (value or "").split(",") if v.strip())
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _shares(ctx, param, value: str | None) -> tuple[float, ...] | None:
    """-ts 3,1 -> (3.0, 1.0)."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected shares like 3,1, got {value!r}") from None


def _options(*options) -> Callable:
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


_model_options = _options(
    click.option("-m", "--model", metavar="NAME|FILE", help="Target: registry name or GGUF path.  "
                 "[default: the registry's default]"),
    click.option("-d", "--draft", metavar="NAME|FILE", default=DEFAULT,
                 help="Draft model: GGUF path or registry name.  [default: a registry target's paired draft]"),
    click.option("--no-draft", is_flag=True, help="Load no draft model."),
    click.option("--heads", metavar="FILE|default",
                 help="Medusa heads GGUF for the target, or 'default' for the shipped ones "
                 "(enables --method medusa)."),
    click.option("--eagle", metavar="FILE|default",
                 help="EAGLE draft GGUF for the target, or 'default' for the shipped one (EAGLE-3 in llama.cpp's "
                 "eagle3 format, or EAGLE-1/2 in ggspec's eagle1; enables --method eagle; `ggspec convert eagle` "
                 "makes one)."),
    click.option("--eagle-backend", type=click.Choice(EAGLE_BACKENDS), default="auto", show_default=True,
                 help="How the EAGLE draft runs: numpy, llama.cpp's eagle3 graph, or the faster "
                 "(timed at start)."),
    click.option("--tree", "tree_shape", type=click.Choice(list(TREE_SHAPES)), default="grown",
                 show_default=True, help="Shape of medusa trees."),
    click.option("--tree-nodes", type=click.IntRange(0, MEDUSA_MAX_NODES), default=0, show_default=True,
                 help="Fixed medusa / eagle tree size, at most --draft-max (0: sized by measured cost)."),
    click.option("-c", "--ctx-size", type=int, default=BackendConfig.n_ctx, show_default=True,
                 help="Context size in tokens."),
    click.option("-ngl", "--gpu-layers", type=int, default=BackendConfig.n_gpu_layers, show_default=True,
                 help="Target layers to offload to the GPU (-1: all)."),
    click.option("--gpu-layers-draft", type=int, help="Draft layers to offload.  [default: as --gpu-layers]"),
    click.option("--threads", type=click.IntRange(min=1), help="CPU threads.  [default: all available]"),
    click.option("--draft-threads", type=click.IntRange(min=1),
                 help="CPU threads of the draft model.  [default: as --threads]"),
    click.option("--rpc", metavar="HOST:PORT[,...]", callback=_endpoints,
                 help="Split the target across these ggml RPC servers (ggspec rpc-server)."),
    click.option("-ts", "--tensor-split", metavar="N,N,...", callback=_shares,
                 help="Target's share on each device: RPC servers, then local GPUs.  [default: by free memory]"),
    click.option("--draft-rpc", metavar="HOST:PORT[,...]", callback=_endpoints,
                 help="Put the draft model on these RPC servers.  [default: local]"),
    click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log on stderr."),
)

_spec_options = _options(
    click.option("--method", type=click.Choice(METHODS), help="Speculation method.  "
                 f"[default: {_SPEC.method}, or none when that cannot run with these models]"),
    click.option("-k", "--draft-max", type=click.IntRange(1, MAX_DRAFT), default=_SPEC.draft_max, show_default=True,
                 help="Most tokens drafted per round (medusa, eagle: tree nodes)."),
    click.option("--typical", is_flag=True,
                 help="Verify medusa trees with typical acceptance: LOSSY, output may differ."),
    click.option("--async-draft/--no-async-draft", default=None,
                 help="Method draft: draft the next round while the target verifies (or never).  "
                 "[default: when measured faster]"),
    click.option("--draft-p-min", type=click.FloatRange(0, 1, max_open=True),
                 help="Method draft: stop drafting before a token the draft model gives less than this "
                 f"probability (0: --draft-max tokens every round).  [default: {DRAFT_P_MIN}, as llama.cpp]"),
)


def _sampling_options(temperature: float = _SAMPLING.temperature) -> Callable:
    return _options(
        click.option("-t", "--temperature", type=float, default=temperature, show_default=True,
                     help="Sampling temperature; 0 for greedy."),
        click.option("--top-k", type=int, default=_SAMPLING.top_k, show_default=True, help="0 disables."),
        click.option("--top-p", type=float, default=_SAMPLING.top_p, show_default=True, help="1 disables."),
        click.option("--min-p", type=float, default=_SAMPLING.min_p, show_default=True, help="0 disables."),
        click.option("-s", "--seed", type=int, help="Random seed.  [default: random]"),
        click.option("--ignore-eos", is_flag=True,
                     help="Never end the answer with an end-of-generation token: generate until "
                          "--max-tokens or a stop string (as llama.cpp's --ignore-eos)."),
    )


def _sampling(opts: dict) -> SamplingConfig:
    return SamplingConfig(temperature=opts.pop("temperature"), top_k=opts.pop("top_k"),
                          top_p=opts.pop("top_p"), min_p=opts.pop("min_p"), seed=opts.pop("seed"),
                          ignore_eos=opts.pop("ignore_eos"))


def _open_engine(opts: dict, draft_max: int = _SPEC.draft_max, draft_p_min: float = _SPEC.draft_p_min,
                 method: str | None = None) -> Engine:
    """An Engine from the model options (popped from opts); its default SpecConfig has these
    draft_max, draft_p_min and method (None: the configuration's default), whose
    verification batch must fit."""
    if opts.pop("verbose"):
        set_verbose(True)
    _tree_options(opts)
    n_ctx = opts.pop("ctx_size")
    target_config = BackendConfig(n_ctx=n_ctx, n_gpu_layers=opts.pop("gpu_layers"), n_threads=opts.pop("threads"),
                                  rpc=opts.pop("rpc"), tensor_split=opts.pop("tensor_split"))
    layers, threads = opts.pop("gpu_layers_draft"), opts.pop("draft_threads")
    draft_config = replace(target_config.local(), rpc=opts.pop("draft_rpc"),
                           n_gpu_layers=target_config.n_gpu_layers if layers is None else layers,
                           n_threads=threads or target_config.n_threads)
    draft = opts.pop("draft")
    if opts.pop("no_draft"):
        draft = None
    engine = Engine(opts.pop("model"), draft, target_config=target_config, draft_config=draft_config,
                    spec=SpecConfig(method or _SPEC.method, draft_max=draft_max, draft_p_min=draft_p_min),
                    heads=opts.pop("heads"),
                    tree_shape=opts.pop("tree_shape"), tree_nodes=opts.pop("tree_nodes"),
                    eagle=opts.pop("eagle"), eagle_backend=opts.pop("eagle_backend"))
    if engine.n_ctx != n_ctx:
        click.secho(f"note: llama.cpp rounded the context size up from {n_ctx} to {engine.n_ctx} tokens",
                    dim=True, err=True)
    return engine


def _tree_options(opts: dict) -> None:
    """Refuse the tree options given on the command line without the heads they shape."""
    given = click.get_current_context().get_parameter_source
    needs = (("eagle_backend", "--eagle-backend", "chooses how an EAGLE draft runs", opts["eagle"] is not None,
              "add --eagle FILE|default"),
             ("tree_shape", "--tree", "shapes Medusa head trees", opts["heads"] is not None,
              "add --heads FILE|default"),
             ("tree_nodes", "--tree-nodes", "sizes Medusa and EAGLE trees",
              opts["heads"] is not None or opts["eagle"] is not None, "add --heads or --eagle"))
    for name, flag, does, loaded, what in needs:
        if not loaded and given(name) is ParameterSource.COMMANDLINE:
            raise click.UsageError(f"{flag} {does}, and none is loaded: {what}, or leave {flag} out")


def _spec(engine: Engine, method: str | None, draft_max: int, typical: bool = False,
          async_draft: bool | None = None, draft_p_min: float | None = None) -> SpecConfig:
    """--method, -k, --async-draft and --draft-p-min (None: DRAFT_P_MIN) for this engine.
    Without --method, the configuration's default method, or none when it cannot run here
    (draft without a draft model)."""
    available = available_methods(engine)
    if method is None:
        method = _SPEC.method if _SPEC.method in available else "none"
    elif method not in available:
        hint = {"draft": "; pass a draft model with -d/--draft",
                "medusa": "; pass Medusa heads with --heads",
                "eagle": "; pass an EAGLE-3 draft with --eagle"}.get(method, "")
        raise GgspecError(f"method {method} is not available with these models "
                          f"(available: {', '.join(available)}){hint}")
    _draft_only(method, async_draft, draft_p_min)
    _typical_only_with_trees(engine, method, typical)
    return SpecConfig(method, draft_max=draft_max, typical=typical, async_draft=async_draft,
                      draft_p_min=DRAFT_P_MIN if draft_p_min is None else draft_p_min)


def _draft_only(method: str, async_draft: bool | None, draft_p_min: float | None) -> None:
    """Refuse --async-draft and --draft-p-min (given: True, a number) with another method
    than draft: they apply to the draft model's rounds."""
    refuse_draft_only(method, [flag for flag, given in (("--async-draft", async_draft),
                                                        ("--draft-p-min", draft_p_min is not None)) if given],
                      "use it with --method draft")


def _typical_only_with_trees(engine: Engine, method: str, typical: bool) -> None:
    """Refuse --typical where no Medusa or EAGLE tree is verified: it changes only how
    their trees are accepted."""
    trees = method in ("medusa", "eagle") or method == "auto" and not {"medusa", "eagle"}.isdisjoint(engine.drafters)
    if typical and not trees:
        raise GgspecError(f"--typical applies to Medusa and EAGLE trees, not to method {method}: "
                          "use it with --method medusa or eagle (and --heads or --eagle)")


def _name(model) -> str | None:
    return None if model is None else str(model.path)


# ---------------------------------------------------------------- run

@cli.command()
@click.argument("prompt", required=False)
@click.option("-f", "--file", "prompt_file", type=click.File(encoding="utf-8", errors="surrogateescape"),
              help="Read the prompt from FILE.")
@_model_options
@_spec_options
@_sampling_options()
@click.option("-n", "--max-tokens", type=int, default=256, show_default=True, help="Most tokens to generate.")
@click.option("--chat/--raw", default=True, show_default=True,
              help="Send the prompt as a user message in the target's chat template, or as is.")
@click.option("--system", help="System message (with --chat).")
@click.option("--stop", multiple=True, help="End the text at this string (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
def run(prompt, prompt_file, method, draft_max, typical, async_draft, draft_p_min, max_tokens, chat, system, stop,
        as_json, **opts) -> None:
    """Generate one answer.

    The prompt is PROMPT, or -f FILE, or stdin (PROMPT '-', or none and stdin piped).
    The text streams to stdout; a stats line follows on stderr. Ctrl-C stops the
    generation and keeps what was generated.
    """
    text = _read_prompt(prompt, prompt_file)
    if system and not chat:
        raise click.UsageError("--system needs --chat")
    sampling = _sampling(opts)
    with _open_engine(opts, draft_max, method=method) as engine:
        spec = _spec(engine, method, draft_max, typical, async_draft, draft_p_min)
        if chat and not engine.target.chat_template:
            raise GgspecError(f"{engine.target.path.name} has no chat template; use --raw")
        messages = [{"role": "system", "content": system}] if system else []
        request = [*messages, {"role": "user", "content": text}] if chat else text
        echo = None if as_json else (lambda piece: click.echo(piece, nl=False))
        with interrupt_cancels(engine):
            result = engine.generate(request, max_tokens=max_tokens, stop=stop, sampling=sampling, spec=spec,
                                     on_text=echo)
        if as_json:
            params = {"max_tokens": max_tokens, "stop": list(stop), "chat": chat, "system": system,
                      **asdict(sampling), "draft_max": spec.draft_max, "draft_p_min": spec.draft_p_min,
                      "ctx_size": engine.n_ctx}
            click.echo(json.dumps(_run_json(engine, result, params), ensure_ascii=False))
            return
    click.echo()
    if result.finish_reason == "cancelled":
        click.secho("[interrupted]", dim=True, err=True)
    click.secho(footer(result.stats), dim=True, err=True)


def _run_json(engine: Engine, result: Result, params: dict) -> dict:
    return {"text": result.text, "tokens": result.tokens, "finish_reason": result.finish_reason,
            "stats": result.stats.to_dict(), "target": _name(engine.target), "draft": _name(engine.draft),
            "method": result.stats.method, "params": params}


def _read_prompt(prompt: str | None, prompt_file) -> str:
    """The prompt from PROMPT, -f FILE or stdin, checked to be UTF-8 text before any model
    loads (bytes that are not come in as lone surrogates, as Python's arguments do)."""
    if prompt_file is not None:
        if prompt is not None:
            raise click.UsageError("give PROMPT or -f FILE, not both")
        text, what = prompt_file.read(), f"the prompt file {prompt_file.name}"
    elif prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        sys.stdin.reconfigure(errors="surrogateescape")
        text, what = sys.stdin.read(), "the prompt on stdin"
    elif prompt is None:
        raise click.UsageError("no prompt: give PROMPT, -f FILE, or pipe text on stdin")
    else:
        text, what = prompt, "the prompt"
    utf8(text, what)
    if not text.strip():
        raise click.UsageError("the prompt is empty")
    return text


# ---------------------------------------------------------------- chat

@cli.command()
@_model_options
@_spec_options
@_sampling_options()
@click.option("-n", "--max-tokens", type=int, default=1024, show_default=True, help="Most tokens per answer.")
@click.option("--system", help="System prompt.")
@click.option("--show-drafts", is_flag=True, help="Colour the text that came from accepted draft tokens.")
@click.option("--resume", metavar="FILE", help="Go on with a chat saved with /save (same models and context size).")
def chat(method, draft_max, typical, async_draft, draft_p_min, max_tokens, system, show_drafts, resume,
         **opts) -> None:
    """Chat interactively, several turns.

    Each turn prefills only the new tokens: the KV caches keep the conversation. Type
    /help for the commands. When stdin is not a terminal, each line is one user message
    (or a /command), and only the answers go to stdout, each ending with a newline.
    With --resume, the saved conversation, caches and settings come back; sampling and
    speculation options given on the command line replace the saved ones.
    """
    sampling = _sampling(opts)
    interactive = sys.stdin.isatty()
    with _open_engine(opts, draft_max, method=method) as engine:
        # resumed, the saved method is the one --async-draft and --draft-p-min must apply to
        # (checked once loaded)
        spec = _spec(engine, method, draft_max, typical, None if resume else async_draft,
                     None if resume else draft_p_min)
        if not engine.target.chat_template:
            raise GgspecError(f"{engine.target.path.name} has no chat template; use ggspec run --raw")
        settings = Settings(sampling, spec, max_tokens)
        session = ChatSession(engine, settings, system=system)
        if resume is not None:
            session.load(resume)
            given = click.get_current_context().get_parameter_source
            values = {**asdict(settings.sampling), **asdict(settings.spec), "max_tokens": max_tokens,
                      "draft_p_min": draft_p_min}
            for name in NAMES:
                if given(name) is ParameterSource.COMMANDLINE:
                    session.set(name, str(values[name]))
            switches = {name: value for name, value in (("typical", typical), ("async_draft", async_draft))
                        if given(name) is ParameterSource.COMMANDLINE}  # (options /set does not take)
            session.settings = replace(session.settings, spec=replace(session.settings.spec, **switches))
            _draft_only(session.settings.spec.method, async_draft, draft_p_min)
            _typical_only_with_trees(engine, session.settings.spec.method, session.settings.spec.typical)
            if given("system") is ParameterSource.COMMANDLINE:
                session.system = system
            click.secho(f"resumed {resume}: {contents(session)}; {session.settings.describe()}", dim=True, err=True)
        if interactive:
            repl(session, show_drafts)
        elif not piped(session):
            sys.exit(1)


# ---------------------------------------------------------------- serve

@cli.command()
@_model_options
@_spec_options
@_sampling_options()
@click.option("-n", "--max-tokens", type=click.IntRange(min=1),
              help="Most tokens per answer when a request sets none.  [default: up to the context size]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free one).")
@click.option("--api-key", envvar="GGSPEC_API_KEY", metavar="KEY",
              help="Require Authorization: Bearer KEY on /v1 routes (or set GGSPEC_API_KEY).")
@click.option("--max-queue", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most requests waiting for the engine; more get 429.")
def serve(method, draft_max, typical, async_draft, draft_p_min, max_tokens, host, port, api_key, max_queue,
          **opts) -> None:
    """Serve an OpenAI-compatible API and a chat page.

    POST /v1/chat/completions and /v1/completions (streamed or not), GET /v1/models,
    /health, /metrics (Prometheus), and a chat page at /. One engine answers one request
    at a time; the others wait in a queue. The sampling options are the defaults for
    requests that do not set them. Ctrl-C stops the server.
    """
    from .server import create_app, listen, serve as run_server  # FastAPI loads only for this command

    if api_key is not None and not api_key.strip():  # (--api-key "$KEY" with KEY unset)
        raise click.BadParameter("the key is empty: give a key, or leave --api-key out", param_hint="--api-key")
    sampling = _sampling(opts)
    sock = listen(host, port)  # fail before loading the models
    with sock, _open_engine(opts, draft_max, method=method) as engine:
        spec = _spec(engine, method, draft_max, typical, async_draft, draft_p_min)
        app = create_app(engine, Settings(sampling, spec, max_tokens or engine.n_ctx), api_key=api_key,
                         max_queue=max_queue)
        bound = sock.getsockname()
        url = f"http://{f'[{bound[0]}]' if ':' in bound[0] else bound[0]}:{bound[1]}"
        click.echo(f"ggspec serve: chat page {url}/  OpenAI API {url}/v1  "
                   f"({engine.target.path.name}, {spec.method}). Ctrl-C stops.", err=True)
        if api_key is None and not ipaddress.ip_address(bound[0]).is_loopback:
            click.secho(f"Warning: listening on {bound[0]} without --api-key: anyone who can reach this "
                        "address can use the model.", fg="yellow", err=True)
        run_server(app, sock)


# ---------------------------------------------------------------- bench

def _method_list(ctx, param, values) -> list[tuple[str, tuple[int, ...]]]:
    """--method lookup --method auto:8,16 -> [("lookup", ()), ("auto", (8, 16))]."""
    out = []
    for value in values:
        method, _, ks = value.partition(":")
        if method not in METHODS:
            raise click.BadParameter(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        out.append((method, _int_list(ctx, param, [ks]) if ks else ()))
    return out


def _int_list(ctx, param, values) -> tuple[int, ...]:
    """-k 2 -k 4 or -k 2,4 (draft lengths, 1 to MAX_DRAFT)."""
    try:
        ks = tuple(int(v) for value in values for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected integers like 2,4,8, got {' '.join(values)!r}") from None
    if any(not 1 <= k <= MAX_DRAFT for k in ks):
        raise click.BadParameter(f"draft lengths run from 1 to {MAX_DRAFT}, got {' '.join(values)!r}")
    return ks


@cli.command()
@_model_options
@click.option("-w", "--workload", "names", multiple=True, type=click.Choice([*benchmark.WORKLOADS, "all"]),
              help="Built-in workload (repeatable).  [default: all, or none with --prompt-file]")
@click.option("--prompt-file", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Add a workload: the file's text as the user message (repeatable).")
@click.option("--method", "methods", multiple=True, callback=_method_list, metavar="METHOD[:K,...]",
              help=f"Method to compare ({'|'.join(METHODS)}; repeatable; none always runs as the baseline); "
                   "METHOD:3,8 gives that method its own draft lengths.  "
                   "[default: every method the models allow]")
@click.option("-k", "--draft-max", "ks", multiple=True, callback=_int_list,
              help=f"Draft length K for methods without their own (repeatable, or 2,4,8).  "
                   f"[default: {_SPEC.draft_max}]")
@click.option("--async-draft/--no-async-draft", default=None,
              help="Method draft: draft ahead during verification, or never.  [default: when measured faster]")
@click.option("--draft-p-min", type=click.FloatRange(0, 1, max_open=True), default=_SPEC.draft_p_min,
              show_default=True, help="Method draft: stop drafting before a token the draft model gives less than "
              "this probability (0: K tokens every round, as the lengths compared).")
@click.option("--async-split", is_flag=True,
              help="Compare method draft drafting in turn on all threads with drafting ahead on the threads "
                   "split between target and draft (e.g. --threads 2: 2 synchronous vs 1 + 1 asynchronous).")
@click.option("--allow-busy", is_flag=True, help="Run even while other processes use the CPU (timings are then wrong).")
@click.option("-r", "--repetitions", type=int, default=1, show_default=True, help="Runs of each cell.")
@click.option("-n", "--max-tokens", type=int, default=128, show_default=True, help="Tokens generated per run.")
@_sampling_options(temperature=0.0)
@click.option("--chat/--raw", default=True, show_default=True, help="Use the chat template or raw prompts.")
@click.option("--native", "native_dir", type=click.Path(), metavar="DIR",
              help="Also run llama.cpp's llama-completion and llama-speculative-simple from DIR "
                   "(built by tools/build_llama_cpp.py).")
@click.option("--native-mode", "native_modes", multiple=True, type=click.Choice(NATIVE_MODES[1:]),
              help="With --native: a llama.cpp speculative mode to run (repeatable; llama-completion's plain "
                   "decoding always runs, as llama.cpp's baseline).  [default: every mode the models allow]")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Also draw tok/s and acceptance by position (needs matplotlib).")
def bench(names, prompt_file, methods, ks, async_draft, draft_p_min, async_split, allow_busy, repetitions, max_tokens,
          chat, native_dir, native_modes, as_json, plot, **opts) -> None:
    """Compare methods and draft lengths.

    Workloads: code (write a function), edit (add type hints to a 60-line module: the
    answer copies most of its input), rewrite (callbacks to async/await), qa (answer
    questions on a given text), prose (an explanation), revise (a second turn that revises
    the first answer). Every cell runs in this one process on the same models; "x none" is
    the speed ratio to plain decoding measured in the same run.
    """
    if plot:
        benchmark.pyplot()  # fail before the long run, not after
    if native_modes and native_dir is None:
        raise click.UsageError("--native-mode chooses among llama.cpp's modes: add --native DIR")
    if native_dir is not None:
        if opts["rpc"] or opts["draft_rpc"]:
            raise click.UsageError("--native runs llama.cpp's tools on this machine only; drop --rpc or --native")
        native_dir = check_dir(native_dir)
    workloads = benchmark.select_workloads(names, prompt_file)  # (prompt files alone: only they run)
    sampling = _sampling(opts)
    ks = ks or (_SPEC.draft_max,)
    threads = opts["threads"] or default_threads()
    try:
        state = machine.check_idle(threads, allow_busy=allow_busy)
    except RuntimeError as e:
        raise GgspecError(str(e)) from None
    k_max = max([*ks, *(k for _, own in methods for k in own)])
    layers = opts["gpu_layers"], opts["gpu_layers_draft"]
    with _open_engine(opts, k_max, draft_p_min) as engine:
        for m, _ in methods:
            _spec(engine, m, k_max)  # refuses a method these models cannot run
        if async_split:
            if methods or async_draft is not None:
                raise GgspecError("--async-split makes its own variants: leave out --method and --async-draft")
            _spec(engine, "draft", k_max)
            try:
                grid = benchmark.async_split_variants(ks, threads)
            except ValueError as e:
                raise GgspecError(f"{e}; use --threads 2 or more") from None
        else:
            grid = benchmark.variants(methods or [(m, ()) for m in available_methods(engine)], ks, async_draft)
        if draft_p_min and not any(v.method == "draft" for v in grid):
            raise GgspecError("--draft-p-min applies to the draft model's rounds: add --method draft")
        try:
            native = None if native_dir is None else LlamaCpp(
                native_dir, engine.target.path, engine.draft.path if engine.draft else None, threads, engine.n_ctx,
                *layers, modes=tuple(native_modes) or None)
        except ValueError as e:
            raise GgspecError(f"--native-mode: {e}; load one with -d/--draft") from None
        runs = len(grid) + (len(native.variants()) if native else 0)
        with tqdm(total=len(workloads) * runs * repetitions, desc="bench", unit="run",
                  leave=False, disable=None) as bar:

            def progress(workload, variant, rep, stats) -> None:
                bar.set_postfix_str(f"{workload.name} {variant.label}: {stats.decode_tokens_per_second:.1f} tok/s")
                bar.update()

            rows = benchmark.run_grid(engine, workloads, grid, repetitions=repetitions, max_tokens=max_tokens,
                                      sampling=sampling, chat=chat, native=native, on_run=progress)
        target, draft = _name(engine.target), _name(engine.draft)
    params = {"max_tokens": max_tokens, "repetitions": repetitions, "chat": chat, **asdict(sampling),
              "draft_p_min": draft_p_min}
    after = machine.state(0.2)
    if as_json:
        click.echo(json.dumps({"target": target, "draft": draft, "params": params,
                               "machine": {"cpu": state.cpu, "cpus": state.cpus, "threads": threads,
                                           "load_before": state.load, "load_after": after.load},
                               "rows": [r.to_dict() for r in rows]}, indent=2))
    else:
        click.echo(f"target {Path(target).name}, draft {Path(draft).name if draft else '-'}; "
                   f"{max_tokens} tokens x {repetitions}, temperature {sampling.temperature}"
                   + (", ignoring end-of-generation tokens" if sampling.ignore_eos else ""))
        click.echo(f"machine: {state.describe(threads)} before, load {after.load:.2f} after; "
                   "x none: median of per-repetition ratios"
                   + ("; x llama.cpp: the same over llama.cpp plain (llama-completion)" if native_dir else ""))
        click.echo(benchmark.table(rows))
    if plot:
        benchmark.plot(rows, plot)
        click.echo(f"plot written to {plot}", err=True)


# ---------------------------------------------------------------- rpc-server

@cli.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="IPv4 address to listen on.")
@click.option("-p", "--port", type=click.IntRange(1, 65535), default=50052, show_default=True,
              help="Port to listen on.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads.  [default: all available]")
@click.option("--cache", type=click.Path(file_okay=False), metavar="DIR",
              help="Keep large tensors received in DIR: a client loading the same model again sends "
                   "only their hashes.")
def rpc_server(host, port, threads, cache) -> None:
    """Serve this machine's GPUs (or CPU) to ggspec --rpc.

    Runs llama.cpp's RPC server (ggml-rpc) until Ctrl-C; clients on other machines then
    split a target model across it with --rpc HOST:PORT. One client at a time. The
    protocol has no authentication or encryption: bind an address that only trusted
    machines reach.
    """
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise click.BadParameter(f"{host!r} is not an IPv4 address (llama.cpp's RPC server takes no names)",
                                 param_hint="--host") from None
    if cache is not None:
        Path(cache).mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:  # a clear error before llama.cpp's
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise GgspecError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    if not address.is_loopback:
        click.secho(f"Warning: llama.cpp's RPC protocol has no authentication: anyone who can reach "
                    f"{host}:{port} can use this machine's devices and memory. Use it on trusted networks only.",
                    fg="yellow", err=True)
    reach = "THIS-MACHINE" if address.is_unspecified else host
    click.echo(f"ggspec rpc-server: listening on {host}:{port}; clients use --rpc {reach}:{port}. Ctrl-C stops.",
               err=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # llama.cpp's banner and client log: stderr
    try:
        serve_rpc(f"{host}:{port}", threads or default_threads(), cache)
    except KeyboardInterrupt:
        click.echo("ggspec rpc-server: stopped", err=True)


# ---------------------------------------------------------------- pull, models, info

@cli.command()
@click.argument("name", required=False)
@click.option("--no-draft", is_flag=True, help="Do not also pull the model's paired draft.")
def pull(name, no_draft) -> None:
    """Download a registry model.

    Downloads NAME and its paired draft into the cache, checking their sha256. NAME
    defaults to the registry's default model; `ggspec models` lists the names.
    """
    name = name or hub.default_model()
    draft = None if no_draft else hub.default_draft(name)
    for n in [name, *([draft] if draft else [])]:
        click.echo(f"{n}  {hub.pull(n)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json) -> None:
    """List registry models, pulled or not."""
    default = hub.default_model()
    entries = []
    for entry in hub.registry().values():
        path = hub.cached_path(entry.name)
        entries.append({"name": entry.name, "default": entry.name == default, "description": entry.description,
                        "size": entry.size, "draft": entry.draft, "path": str(path) if path else None})
    if as_json:
        click.echo(json.dumps({"cache": str(hub.cache_dir()), "models": entries}, indent=2))
        return
    rows = [("NAME", "SIZE", "DRAFT", "PULLED")]
    for e in entries:
        rows.append((e["name"] + (" *" if e["default"] else ""), _size(e["size"]), e["draft"] or "-",
                     e["path"] or f"no (ggspec pull {e['name']})"))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[3])
    click.secho(f"* default model. Cache: {hub.cache_dir()} (set GGSPEC_CACHE to move it)", dim=True)


@cli.command()
@click.argument("file", metavar="FILE|NAME")
@click.option("-d", "--draft", metavar="FILE|NAME", help="Check whether this draft can pair with FILE.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(file, draft, as_json) -> None:
    """Summarise a GGUF model file.

    FILE may also be the name of a pulled registry model. With --draft, says whether the
    two models can pair (same tokenizer) and why not; exits with code 1 when the draft is not compatible.
    """
    cpu = BackendConfig(n_gpu_layers=0)
    with Model(hub.local(file), cpu) as target:
        summary = _summary(target)
        if draft is not None:
            with Model(hub.local(draft), cpu) as d:
                summary["draft"] = str(d.path)
                try:
                    check_vocab_compatible(target, d)
                    summary["compatible"] = True
                    summary["reason"] = f"same tokenizer ({summary['tokenizer']}, {d.n_vocab} tokens)"
                except GgspecError as e:
                    summary["compatible"], summary["reason"] = False, str(e)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        rows = [
            ("file", f"{summary['file']} ({_size(summary['file_size'])})"),
            ("name", summary["name"] or "-"),
            ("architecture", summary["architecture"]),
            ("parameters", f"{_count(summary['parameters'])} ({summary['parameters']:,})"),
            ("quantization", summary["quantization"]),
            ("context", f"{summary['context_length']} tokens (training)"),
            ("vocabulary", f"{summary['vocab_size']} tokens ({summary['tokenizer']} tokenizer)"),
            ("layers", f"{summary['layers']}, embedding size {summary['embedding_size']}"),
            ("chat template", "yes" if summary["chat_template"] else "no"),
        ]
        if draft is not None:
            rows += [("draft", summary["draft"]),
                     ("compatible", ("yes: " if summary["compatible"] else "no: ") + summary["reason"])]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            click.echo(f"{k:<{width}}  {v}")
    if draft is not None and not summary["compatible"]:
        sys.exit(1)


@cli.group()
def convert() -> None:
    """Convert published draft heads to GGUF."""


@convert.command("eagle")
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-m", "--model", "target", required=True, metavar="FILE|NAME",
              help="Target model the draft was trained for (its tokenizer goes into OUT).")
@click.option("--dtype", type=click.Choice(["f32", "f16", "q8_0"]), default="f16", show_default=True,
              help="Type of the weight matrices.")
def convert_eagle(src, out, target, dtype) -> None:
    """An EAGLE checkpoint to GGUF: EAGLE-3 to llama.cpp's eagle3, EAGLE-1/2 to ggspec's eagle1.

    SRC is a directory with config.json and *.safetensors (or pytorch_model.bin, read
    with torch): EAGLE-3 in the SafeAILab / SpecForge layout (midlayer.*) or the
    speculators layout (layers.0.*); EAGLE-1/2 as SafeAILab's cnets1.py saves it (fc over
    [embedding ; hidden state], layers.0.*), told apart by the tensors. Prints the written path.
    """
    from .heads.convert import convert_eagle as run_convert

    click.echo(run_convert(src, hub.local(target), out, dtype=dtype))


_COLLECT = CollectConfig()

_train_options = _options(
    click.argument("target", metavar="TARGET"),
    click.option("--corpus", type=click.Path(exists=True, path_type=Path),
                 help="Text file, or directory searched recursively: learn the target's "
                 "predictions over it."),
    click.option("--prompts", type=click.Path(exists=True, path_type=Path),
                 help="Prompts, one per line: learn the target's own greedy answers to them "
                 "(self-distillation; tools/code_prompts.py writes some)."),
    click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
                 help="GGUF file to write."),
    click.option("-w", "--work-dir", type=click.Path(file_okay=False, path_type=Path),
                 help="Cache of the collected rows and the checkpoint.  [default: OUTPUT.work]"),
    click.option("-n", "--max-tokens", type=int, default=_COLLECT.max_tokens, show_default=True,
                 help="Rows to collect."),
    click.option("--window", type=int, default=_COLLECT.window, show_default=True,
                 help="Tokens per llama.cpp pass (prompt and answer)."),
    click.option("--file-tokens", type=int, default=_COLLECT.file_tokens, show_default=True,
                 help="Most tokens per corpus file."),
    click.option("--pattern", default=_COLLECT.pattern, show_default=True,
                 help="File glob inside a corpus or prompts directory."),
    click.option("--answer-tokens", type=int, default=_COLLECT.answer_tokens, show_default=True,
                 help="With --prompts: most tokens per answer."),
    click.option("--parallel", type=int, default=_COLLECT.parallel, show_default=True,
                 help="With --prompts: answers decoded together."),
    click.option("-t", "--threads", type=click.IntRange(min=1), help="llama.cpp threads."),
    click.option("-ngl", "--gpu-layers", type=int, default=_COLLECT.n_gpu_layers, show_default=True,
                 help="Target layers to offload (-1: all)."),
    click.option("-e", "--epochs", type=int, default=4, show_default=True, help="Passes over the data."),
    click.option("-b", "--batch-size", type=int, help="Rows (medusa) or chunks of --seq-len rows (eagle) per step.  [default: 256, 8]"),
    click.option("--lr", type=float, help="Adam learning rate, decayed to 10% (cosine).  [default: 1e-3, 5e-4]"),
    click.option("--held-out", type=float, default=0.1, show_default=True,
                 help="Share of the files (prompts) kept for evaluation."),
    click.option("--dtype", type=click.Choice(["f32", "f16", "q8_0"]),
                 help="Type of the weight matrices.  [default: f16 (medusa), q8_0 (eagle)]"),
    click.option("-s", "--seed", type=int, default=0, show_default=True, help="Data order and initialisation."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bars."),
)


def _collect_config(opts: dict) -> tuple[Path, Path, CollectConfig]:
    """The target file, the text and how to collect it, from the shared training options."""
    if (opts["corpus"] is None) == (opts["prompts"] is None):
        raise click.UsageError("give exactly one of --corpus DIR and --prompts FILE")
    target = hub.resolve(opts["target"], progress=not opts["quiet"])
    cfg = CollectConfig(max_tokens=opts["max_tokens"], window=opts["window"],
                        file_tokens=opts["file_tokens"], pattern=opts["pattern"], seed=opts["seed"],
                        n_threads=opts["threads"], n_gpu_layers=opts["gpu_layers"],
                        answers=opts["prompts"] is not None, answer_tokens=opts["answer_tokens"],
                        parallel=opts["parallel"])
    return target, opts["corpus"] or opts["prompts"], cfg


def _given(opts: dict, **names: str) -> dict:
    """Config fields from options the user gave (None: the config's default)."""
    return {field: opts[o] for field, o in names.items() if opts[o] is not None}


@cli.group(epilog="""\b
Examples:
  python tools/code_prompts.py prompts.txt
  ggspec train eagle qwen2.5-coder-1.5b --prompts prompts.txt -o eagle.gguf -n 20000
  ggspec train medusa qwen2.5-coder-1.5b --corpus /usr/lib/python3.11 --pattern '*.py' -o heads.gguf
""")
def train() -> None:
    """Train draft heads for a GGUF target on this machine's CPU.

    Rows are collected through llama.cpp into the work directory and fitted there; run
    the same command again to resume. Prints the written path; the report and progress
    go to stderr.
    """


@train.command("medusa")
@_train_options
@click.option("--heads", "n_heads", type=click.IntRange(min=1), default=4, show_default=True,
              help="Number of heads.")
@click.option("--residual-layers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Residual layers per head.")
@click.option("--vocab-size", type=click.IntRange(min=0), default=4096, show_default=True,
              help="Output rows: the most frequent labels (0: the whole vocabulary).")
@click.option("--untied", is_flag=True, help="Train an output matrix per head instead of the target's, frozen.")
@click.option("--labels", type=click.Choice(["distill", "corpus"]), default="distill", show_default=True,
              help="The target's own predictions or the corpus tokens.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW decay.")
def train_medusa(n_heads, residual_layers, vocab_size, untied, labels, weight_decay, **opts) -> None:
    """Medusa heads (GGUF, architecture medusa) for TARGET."""
    from .heads.fit import TrainConfig, train_medusa as fit_medusa

    target, text, ccfg = _collect_config(opts)
    tcfg = TrainConfig(n_heads=n_heads, n_layers=residual_layers, vocab_size=vocab_size, tied=not untied,
                       labels=labels, epochs=opts["epochs"], weight_decay=weight_decay,
                       heldout=opts["held_out"], seed=opts["seed"],
                       **_given(opts, batch_size="batch_size", lr="lr", dtype="dtype"))
    work = opts["work_dir"] or Path(f"{opts['output']}.work")
    report = fit_medusa(target, text, opts["output"], work, ccfg, tcfg, progress=not opts["quiet"],
                        log=lambda s: click.echo(s, err=True))
    click.echo(format_report(report), err=True)
    click.echo(report.path)


def _layer_ids(ctx, param, value: str | None) -> tuple[int, int, int] | None:
    """--layers 2,14,25 -> (2, 14, 25)."""
    if value is None:
        return None
    try:
        layers = tuple(int(v) for v in value.split(","))
    except ValueError:
        layers = ()
    if len(layers) != 3:
        raise click.BadParameter(f"three layer ids like 2,14,25, got {value!r}")
    return layers


@train.command("eagle")
@_train_options
@click.option("--layers", metavar="A,B,C", callback=_layer_ids,
              help="Target layers whose inputs the draft reads.  [default: 2, n/2, n-3]")
@click.option("--draft-vocab", type=click.IntRange(min=0), default=8192, show_default=True,
              help="Output rows: the target's most frequent predictions, mapped by d2t (0: all).")
@click.option("--ff", "n_ff", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Feed-forward size of the draft layer.")
@click.option("--ttt-steps", type=click.IntRange(min=1), default=3, show_default=True,
              help="Training-time test: draft steps unrolled, feeding back the draft's own output.")
@click.option("--steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Optimizer steps (0: --epochs passes).")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True,
              help="Consecutive rows of a window per training chunk (the draft's attention span).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Steps between checkpoints in the work directory.")
@click.option("--resume/--restart", default=True, show_default=True,
              help="Continue from the work directory's checkpoint, or start the fit over.")
def train_eagle(layers, draft_vocab, n_ff, ttt_steps, steps, seq_len, checkpoint_every, resume, **opts) -> None:
    """An EAGLE-3 draft (llama.cpp's eagle3 GGUF) for TARGET, fitted in torch (pip install
    'ggspec[train]')."""
    fit_eagle = _eagle_trainer()
    target, text, ccfg = _collect_config(opts)
    tcfg = fit_eagle.EagleTrainConfig(
        layers=layers, draft_vocab=draft_vocab, n_ff=n_ff, ttt_steps=ttt_steps, steps=steps,
        epochs=opts["epochs"], seq_len=seq_len, heldout=opts["held_out"], seed=opts["seed"],
        checkpoint_every=checkpoint_every, **_given(opts, batch_size="batch_size", lr="lr", dtype="dtype"))
    work = opts["work_dir"] or Path(f"{opts['output']}.work")
    report = fit_eagle.train_eagle(target, text, opts["output"], work, ccfg, tcfg, resume=resume,
                                   progress=not opts["quiet"], log=lambda s: click.echo(s, err=True))
    click.echo(format_eagle_report(report), err=True)
    click.echo(report.path)


def _eagle_trainer():
    """ggspec.heads.fit_eagle, or one line saying how to install torch."""
    try:
        return importlib.import_module("ggspec.heads.fit_eagle")
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise GgspecError("training EAGLE drafts needs torch: pip install 'ggspec[train]' "
                          "(torch==2.13.0, CPU)") from None


def _summary(m: Model) -> dict:
    import gguf

    arch = m.metadata("general.architecture") or "?"
    file_type = m.metadata("general.file_type")
    try:
        quant = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        quant = m.describe().split(" ", 2)[-1]  # "qwen2 1.5B Q4_K - Medium" -> "Q4_K - Medium"
    layers = m.metadata(f"{arch}.block_count")
    return {"file": str(m.path), "file_size": m.path.stat().st_size, "name": m.metadata("general.name"),
            "architecture": arch, "parameters": m.n_params, "quantization": quant,
            "context_length": m.n_ctx_train, "vocab_size": m.n_vocab,
            "tokenizer": m.metadata("tokenizer.ggml.model") or "?",
            "layers": int(layers) if layers else None, "embedding_size": m.n_embd,
            "chat_template": m.chat_template is not None}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} GiB"


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def main() -> None:
    cli(prog_name="ggspec")


if __name__ == "__main__":
    main()
