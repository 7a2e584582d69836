"""Frozen configuration dataclasses, validated at construction."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

METHODS = ("auto", "draft", "eagle", "lookup", "medusa", "none")
MAX_DRAFT = 64  # the most tokens one round may draft
MIN_TEMPERATURE = 1e-3  # below it (but above 0) logits / T overflow to NaN probabilities


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen. temperature 0 means greedy (argmax); otherwise it is at
    least MIN_TEMPERATURE (0.001).

    Truncation follows llama.cpp's default order: top-k, then top-p and min-p on the
    temperature-1 softmax, then temperature. 0 disables top-k; 1.0 disables top-p;
    0.0 disables min-p. The same truncation is applied to target and draft distributions.

    ignore_eos: never choose an end-of-generation token (llama.cpp's --ignore-eos: their
    logits are set to -inf), so an answer runs to max_tokens or a stop string; the output
    is then the target's decoding conditioned on not ending.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, "
                             f"got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        if not (0 <= self.min_p < 1):
            raise ValueError(f"min_p must be in [0, 1) (0 disables it), got {self.min_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @functools.cached_property  # (read several times a round)
    def greedy(self) -> bool:
        return self.temperature == 0


DRAFT_P_MIN = 0.75  # llama.cpp's default --draft-p-min: method draft's on the command line


@dataclass(frozen=True)
class SpecConfig:
    """Which speculation method runs and how much it drafts.

    method: "auto" (the controller picks drafter and length each round from measured
    costs), "draft" (draft model), "lookup" (prompt lookup), "none" (plain decoding).
    draft_max: most tokens drafted per round (K: fixed for draft / lookup, a cap for auto).
    draft_p_min (method draft): the draft model stops before a token it gives less than
    this probability (at temperature 0 its most likely token's, else the largest of the
    distribution it draws from), as llama.cpp's --draft-p-min (DRAFT_P_MIN, the command
    line's default); 0 drafts draft_max tokens every round. auto chooses the length of its
    draft-model chains itself and does not stop them early.
    async_draft (method draft): the draft model drafts the next round while the target
    verifies this one; None lets the controller choose by measured speed, True / False
    force it on / off. Other methods ignore it.
    """

    method: str = "auto"
    draft_max: int = 16
    draft_p_min: float = 0.0
    typical: bool = False
    async_draft: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (isinstance(self.draft_max, int) and 1 <= self.draft_max <= MAX_DRAFT):
            raise ValueError(f"draft_max must be an integer from 1 to {MAX_DRAFT}, got {self.draft_max!r}")
        if not (0 <= self.draft_p_min < 1):
            raise ValueError(f"draft_p_min must be in [0, 1), got {self.draft_p_min!r}")
        if not (self.async_draft is None or isinstance(self.async_draft, bool)):
            raise ValueError(f"async_draft must be None (the controller chooses), True or False, "
                             f"got {self.async_draft!r}")


def rpc_endpoint(text: str) -> str:
    """A ggml RPC server address "HOST:PORT", checked (ggml-rpc splits at the first colon,
    so HOST is a name or an IPv4 address)."""
    host, sep, port = text.strip().partition(":")
    if not (sep and host and ":" not in port and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"RPC server {text!r} is not HOST:PORT (for example 192.168.1.7:50052)")
    return f"{host}:{int(port)}"


@dataclass(frozen=True)
class BackendConfig:
    """How one model is loaded. n_gpu_layers -1 offloads every layer (when built with a GPU
    backend); n_threads None uses llama.cpp's default.

    rpc: ggml RPC servers ("HOST:PORT") that take the offloaded layers, in front of the
    local GPUs (llama.cpp's order); tensor_split: the share of each of those devices, in
    that order (None: by their free memory).
    """

    n_ctx: int = 4096
    n_batch: int = 512
    n_gpu_layers: int = -1
    n_threads: int | None = None
    flash_attn: bool | None = None
    rpc: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.n_ctx, int) and self.n_ctx >= 16):
            raise ValueError(f"n_ctx must be an integer >= 16, got {self.n_ctx!r}")
        if not (isinstance(self.n_batch, int) and self.n_batch >= 1):
            raise ValueError(f"n_batch must be a positive integer, got {self.n_batch!r}")
        if not (isinstance(self.n_gpu_layers, int) and self.n_gpu_layers >= -1):
            raise ValueError(f"n_gpu_layers must be -1 (all) or >= 0, got {self.n_gpu_layers!r}")
        if self.n_threads is not None and not (isinstance(self.n_threads, int) and self.n_threads >= 1):
            raise ValueError(f"n_threads must be a positive integer, got {self.n_threads!r}")
        if isinstance(self.rpc, str):
            raise ValueError(f"rpc must be a list of HOST:PORT strings, got the string {self.rpc!r}")
        object.__setattr__(self, "rpc", tuple(rpc_endpoint(e) for e in self.rpc))
        if len(set(self.rpc)) < len(self.rpc):
            raise ValueError(f"rpc names a server twice: {', '.join(self.rpc)}")
        if self.tensor_split is not None:
            split = tuple(float(x) for x in self.tensor_split)
            if not (split and all(math.isfinite(x) and x >= 0 for x in split) and sum(split) > 0):
                raise ValueError(f"tensor_split must be shares >= 0 with a positive sum, got {self.tensor_split!r}")
            object.__setattr__(self, "tensor_split", split)

    def local(self) -> BackendConfig:
        """This configuration on local devices only: how a draft model loads unless told otherwise."""
        return replace(self, rpc=(), tensor_split=None)
