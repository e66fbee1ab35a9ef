"""The precision policy (pallas_kernels/precision.py): what "auto" resolves to, the bf16 path
of the chunked ops against the float32 references at bf16 tolerances, bf16_einsum's backward,
and a bf16 train step's lowered program holding no float32 HIGHEST matmul outside the named
exceptions (benchmarks/precision.py does the counting)."""

import re
import sys
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.schema import ModelConfig
from pallas_kernels.backends import lowering_for
from pallas_kernels.gated_delta_rule import gated_delta_rule
from pallas_kernels.gla import gla, simple_gla
from pallas_kernels.linear_attention import linear_attention
from pallas_kernels.precision import Precision, bf16_einsum, resolve_precision
from tests.parity import relative_error

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from common import load_bench  # noqa: E402

B, T, H, K, V = 2, 50, 2, 16, 16


def test_config_names_the_same_precisions_as_the_ops():
    hints = typing.get_type_hints(ModelConfig)
    assert typing.get_args(hints["precision"]) == typing.get_args(Precision)


def test_auto_resolves_per_platform_and_dtype():
    assert resolve_precision("auto", jnp.bfloat16) == "highest"          # CPU: no fast bf16
    assert resolve_precision("auto", jnp.bfloat16, "pallas_gpu") == "bf16"  # a kernel: MXU/TC
    assert resolve_precision("auto", jnp.float32, "pallas_gpu") == "highest"
    for platform in ("gpu", "tpu"):
        with lowering_for(platform):
            assert resolve_precision("auto", jnp.bfloat16) == "bf16"
            assert resolve_precision("auto", jnp.float32) == "highest"
    assert resolve_precision("bf16", jnp.float32) == "bf16"
    assert resolve_precision("highest", jnp.bfloat16) == "highest"
    with pytest.raises(ValueError, match="unknown precision 'tf32'; choose one of 'auto', "
                                         "'highest', 'bf16'"):
        resolve_precision("tf32", jnp.float32)


def _inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, H, V))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H)) + 3.0)
    gk = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H, K)) + 3.0) / 4
    beta = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H)))
    return q, k, v, g, gk, beta


OPS = {
    "gated_delta_rule": lambda x, **kw: gated_delta_rule(x[0], x[1], x[2], x[3], x[5], **kw),
    "delta_rule": lambda x, **kw: gated_delta_rule(x[0], x[1], x[2], None, x[5], **kw),
    "gla": lambda x, **kw: gla(x[0], x[1], x[2], x[4], **kw),
    "simple_gla": lambda x, **kw: simple_gla(x[0], x[1], x[2], x[3], **kw),
    "linear_attention": lambda x, **kw: linear_attention(jax.nn.elu(x[0]) + 1,
                                                         jax.nn.elu(x[1]) + 1, x[2], **kw),
}
# max |bf16 path - float32 reference| / max |reference| over outputs and input gradients, on
# the same float32 inputs (only the matmul operands are rounded to bf16, 8 mantissa bits, so
# one rounding is 2^-9 ~ 2e-3 relative): measured 4.2e-3 .. 8.5e-3 over these ops and seeds
# 0-2 (delta_rule seed 2 the largest), the float32 path <= 5.7e-7.
BF16_TOL = 1.5e-2
F32_TOL = 1e-4


@pytest.mark.parametrize("op", sorted(OPS))
def test_bf16_path_against_the_float32_reference(op):
    x = _inputs(seed=len(op))
    ct = jax.random.normal(jax.random.key(9), (B, T, H, V))

    def run(xs, **kw):
        o = OPS[op](xs, chunk_size=16, **kw)[0]
        return jnp.sum(o * ct), o

    grads = {}
    for name, kw in (("reference", dict(backend="reference")),
                     ("highest", dict(backend="xla", precision="highest")),
                     ("bf16", dict(backend="xla", precision="bf16"))):
        (_, o), g = jax.jit(jax.value_and_grad(lambda xs, kw=kw: run(xs, **kw), has_aux=True))(x)
        grads[name] = (o, *[a for a in g if a is not None])
    errors = {name: max(relative_error(np.asarray(a), np.asarray(r))
                        for a, r in zip(grads[name], grads["reference"], strict=True))
              for name in ("highest", "bf16")}
    assert errors["highest"] < F32_TOL
    assert errors["bf16"] < BF16_TOL
    # The bf16 path really rounds: it is not the float32 computation under another name.
    assert errors["bf16"] > 10 * errors["highest"]


def test_bf16_einsum_backward_multiplies_bf16_operands():
    a = jax.random.normal(jax.random.key(0), (4, 8, 16)).astype(jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (4, 16, 8)).astype(jnp.bfloat16)
    f = lambda a, b: jnp.sum(jnp.sin(bf16_einsum("bij,bjk->bik", a, b)))
    exact = lambda a, b: jnp.sum(jnp.sin(jnp.einsum("bij,bjk->bik", a.astype(jnp.float32),
                                                    b.astype(jnp.float32))))
    got, want = jax.grad(f, (0, 1))(a, b), jax.grad(exact, (0, 1))(a, b)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        assert relative_error(np.asarray(g, np.float32), np.asarray(w, np.float32)) < 1e-2
    text = jax.jit(jax.grad(f, (0, 1))).lower(a, b).as_text()
    dots = re.findall(r"dot_general .*? : \(tensor<([^>]*)>, tensor<([^>]*)>\)", text)
    assert len(dots) == 3 and all(lhs.endswith("bf16") and rhs.endswith("bf16")
                                  for lhs, rhs in dots)


@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["gated_deltanet", "gla", "attn"])
def test_bf16_train_step_has_no_float32_highest_matmul_outside_the_solve(mixer, capsys):
    bench = load_bench("precision")
    summary = bench.dot_summary(bench.lowered_train_step(mixer, seq_len=64))
    with capsys.disabled():
        print(f"\n{mixer}: bf16-operand share of dot FLOPs {summary['bf16_share']:.3f} "
              f"({summary['dots']} dots; triangular solve "
              f"{summary['exception_flops'] / summary['flops']:.3f})")
    assert summary["dots"] > 10
    assert summary["f32_highest_flops"] == 0, summary["offenders"][:5]
    # What is not bf16 is the named exception (the delta rules' solve) and nothing else.
    other = 1 - summary["bf16_share"] - summary["exception_flops"] / summary["flops"]
    assert other < 1e-9
    if mixer == "gated_deltanet":
        assert summary["exception_flops"] > 0
