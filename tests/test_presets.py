"""configs/presets/: the papers' comparison sizes, counted with jax.eval_shape (nothing allocated).

Each preset's count must (a) be the one its header comment states (the README table is
benchmarks/preset_params.py's print of the same counts), (b) sit within 5% of Transformer++ at
its scale (the presets are parameter-matched by depth), and for attention and Gated DeltaNet
(c) equal the count written out by hand from the layers' weight shapes.
"""

import re
from pathlib import Path

import jax
import pytest
from flax import nnx

from models.config_check import load_config
from models.lm import build_model

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "presets"
FAMILIES = ["attn", "gated_deltanet", "gdn_swa", "mla", "titans_mag", "mom", "kimi_linear",
            "mamba2", "nsa"]
SCALES = ["125m", "340m"]


def param_count(cfg) -> int:
    shapes = nnx.eval_shape(lambda: build_model(cfg.model))
    return sum(x.size for x in jax.tree.leaves(nnx.state(shapes, nnx.Param)))


@pytest.fixture(scope="module")
def counts():
    return {p.stem: param_count(load_config(p)) for p in sorted(PRESETS.glob("*.yaml"))}


def test_the_preset_grid_is_complete(counts):
    assert sorted(counts) == sorted(f"{f}_{s}" for f in FAMILIES for s in SCALES)


@pytest.mark.parametrize("name", [f"{f}_{s}" for f in FAMILIES for s in SCALES])
def test_count_is_the_stated_one_and_matches_transformer(counts, name):
    header = (PRESETS / f"{name}.yaml").read_text().splitlines()[0]
    stated = float(re.search(r"([\d.]+)M parameters", header).group(1))
    assert abs(counts[name] / 1e6 - stated) < 0.05 + 1e-9, (name, counts[name], header)
    scale = name.rsplit("_", 1)[1]
    reference = counts[f"attn_{scale}"]
    assert abs(counts[name] / reference - 1) < 0.05, (name, counts[name], reference)
    lo, hi = {"125m": (120e6, 145e6), "340m": (340e6, 390e6)}[scale]
    assert lo <= counts[name] <= hi


def _embeddings(m):
    return 2 * m.vocab_size * m.d_model + m.d_model           # untied embed + head, final norm


def _mlp(m):
    return 3 * m.d_model * m.resolved_d_ff + 2 * m.d_model  # SwiGLU gate_up + down, 2 norms


@pytest.mark.parametrize("scale", SCALES)
def test_transformer_count_by_hand(counts, scale):
    m = load_config(PRESETS / f"attn_{scale}.yaml").model
    assert not m.tie_embeddings and m.resolved_kv_heads == m.n_heads
    attn = 4 * m.d_model * m.n_heads * m.resolved_head_dim  # q, k, v, out (MHA)
    assert counts[f"attn_{scale}"] == _embeddings(m) + m.n_layers * (attn + _mlp(m))


@pytest.mark.parametrize("scale", SCALES)
def test_gated_deltanet_count_by_hand(counts, scale):
    m = load_config(PRESETS / f"gated_deltanet_{scale}.yaml").model
    a = m.args_for("gated_deltanet")
    d, h = m.d_model, a.n_heads
    k = d // h                                      # head_dim null: d_model / n_heads
    v = int(k * a.expand_v)
    gdn = (2 * d * h * k                            # q, k projections
           + 2 * d * h * v                          # v projection and the output gate W_g
           + h * v * d                              # o_proj
           + 2 * d * h + 2 * h                      # beta, decay-gate projections; A_log, dt_bias
           + a.conv_width * (2 * h * k + h * v)     # depthwise short convs on q, k, v
           + v)                                     # the output RMSNorm's scale (shared by heads)
    assert counts[f"gated_deltanet_{scale}"] == _embeddings(m) + m.n_layers * (gdn + _mlp(m))
