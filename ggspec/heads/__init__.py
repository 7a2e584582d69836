"""Draft heads on the target's hidden states: Medusa, EAGLE-3 and EAGLE-1/2.

target.py   the target's fingerprint and tensors, shared by every head kind
files.py    validated GGUF reading and writing of head files
nn.py       the forward primitives (numpy), once
medusa.py   Medusa heads: format, loading, evaluation
eagle.py    EAGLE-3 heads in llama.cpp's eagle3 format: loading, saving, numpy forward
            (and the draft layer's parts EAGLE-1/2 shares)
eagle1.py   EAGLE-1/2 heads in ggspec's eagle1 format: loading, saving, numpy forward
convert.py  EAGLE checkpoints (SpecForge / speculators / SafeAILab EAGLE-1/2) to GGUF
collect.py, fit.py, report.py   training by stage: hidden states, fitting, evaluation
"""

from .files import WEIGHT_TYPES
from .medusa import (TOP_K, MedusaHeads, load_heads, out_weight_name, res_bias_name,
                     res_weight_name, save_heads)
from .nn import sigmoid, silu
from .target import TargetFingerprint, TargetInfo, read_target, vocab_hash

__all__ = ["TOP_K", "WEIGHT_TYPES", "MedusaHeads", "TargetFingerprint", "TargetInfo",
           "load_heads", "out_weight_name", "read_target", "res_bias_name", "res_weight_name",
           "save_heads", "sigmoid", "silu", "vocab_hash"]
