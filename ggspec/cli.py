"""The ggspec command line. The only place that prints or raises ClickException."""

from __future__ import annotations

import sys

import click

from . import __version__
from .config import BackendConfig, SamplingConfig, SpecConfig
from .engine import Engine
from .errors import GgspecError
from .stats import footer


@click.group(epilog="""\b
Examples:
  ggspec run "Write a Python function that reverses a string."
  ggspec run -t 0 -k 4 --method draft "Explain recursion."
""")
@click.version_option(__version__, prog_name="ggspec")
def cli() -> None:
    """Exact speculative decoding for local GGUF models."""


@cli.command()
@click.argument("prompt")
@click.option("-m", "--model", default=None, help="Registry name or target GGUF path.")
@click.option("-d", "--draft", default="default", help="Draft GGUF path or registry name.")
@click.option("--method", type=click.Choice(["draft", "none"]), default="draft", help="Speculation method.")
@click.option("-k", "--draft-max", type=int, default=4, show_default=True, help="Most tokens drafted a round.")
@click.option("-n", "--max-tokens", type=int, default=256, show_default=True, help="Most tokens generated.")
@click.option("-t", "--temperature", type=float, default=0.8, show_default=True, help="0 for greedy.")
@click.option("-s", "--seed", type=int, default=None, help="Random seed.")
@click.option("--ctx-size", type=int, default=4096, show_default=True, help="Context size in tokens.")
def run(prompt, model, draft, method, draft_max, max_tokens, temperature, seed, ctx_size) -> None:
    """Generate a completion for PROMPT."""
    try:
        spec = SpecConfig(method=method, draft_max=draft_max)
        sampling = SamplingConfig(temperature=temperature, seed=seed)
        with Engine(model, draft, target_config=BackendConfig(n_ctx=ctx_size), spec=spec) as engine:
            result = engine.generate([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                     sampling=sampling,
                                     on_text=lambda piece: print(piece, end="", flush=True))
    except (GgspecError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    print()
    click.secho(footer(result.stats), dim=True, err=True)


def main() -> None:
    cli(prog_name="ggspec")


if __name__ == "__main__":
    sys.exit(main())
