"""Token mixers (one file per family) and the blocks they are built from."""

from layers.attention import Attention, AttentionArgs, KVCache
from layers.mlp import SwiGLU
from layers.norm import RMSNorm
from layers.registry import MIXERS, build_mixer
from layers.rope import apply_rope

__all__ = ["Attention", "AttentionArgs", "KVCache", "MIXERS", "RMSNorm", "SwiGLU",
           "apply_rope", "build_mixer"]
