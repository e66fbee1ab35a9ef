"""Which matmuls of a bf16 train step run with bf16 operands: the precision policy
(pallas_kernels/precision.py) read back from the lowered program.

For each mixer, a 2-layer model with model.dtype=bfloat16 and model.precision=auto, its jitted
train step (forward, backward, optimizer) on the mixer's "xla" backend, lowered for a GPU from
this CPU (`lowering_platforms=("cuda",)` lowers without a GPU), then every
stablehlo.dot_general of the lowered text is counted by its operand dtypes and precision:

    bf16 share     dot FLOPs whose operands are both bf16 / all dot FLOPs
    f32 HIGHEST    dot FLOPs with float32 operands at Precision.HIGHEST, outside the named
                   exceptions (EXCEPTIONS: scopes whose float32 is deliberate); the policy wants
                   none of them in a bf16 step
    exceptions     dot FLOPs inside EXCEPTIONS

    python benchmarks/precision.py [--mixers gated_deltanet gla attn] [--seq_len 256]

Writes benchmarks/results/precision_cpu.{md,json}. tests/test_precision.py asserts the
policy on the same analysis.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from math import prod
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

# Named scopes whose matmuls stay float32 at HIGHEST on purpose (pallas_kernels/precision.py):
# the delta rules' unit-lower triangular solve, whose rows depend on the rows before them.
EXCEPTIONS = ("triangular_solve",)   # pallas_kernels/triangular.SCOPE

_DOT = re.compile(r"stablehlo\.dot_general .*?contracting_dims = \[([\d, ]*)\] x \[[\d, ]*\]"
                  r"(?:, precision = \[(\w+), (\w+)\])?.*? : \(tensor<([^>]*)>, tensor<([^>]*)>\)"
                  r" -> tensor<([^>]*)> loc\((#loc\d+)\)")
_LOC = re.compile(r"^(#loc\d+) = loc\((.*)\)$")


def _shape_and_dtype(tensor: str) -> tuple[tuple[int, ...], str]:
    *dims, dtype = tensor.split("x")
    return tuple(int(d) for d in dims), dtype


def _location_names(text: str) -> dict[str, str]:
    """#locN -> the names it reaches through nested loc(...) references (a scope path)."""
    raw = {m.group(1): m.group(2) for line in text.splitlines() if (m := _LOC.match(line))}
    memo: dict[str, str] = {}

    def names(ref: str, depth: int = 0) -> str:
        if ref in memo or depth > 50:
            return memo.get(ref, "")
        body = raw.get(ref, "")
        parts = re.findall(r'"([^"]*)"', body)
        parts += [names(r, depth + 1) for r in re.findall(r"#loc\d+", body)]
        memo[ref] = " ".join(parts)
        return memo[ref]

    return {ref: names(ref) for ref in raw}


def dot_summary(lowered_text: str) -> dict:
    """Dot FLOPs of a lowered program (`.as_text(debug_info=True)`) by operand dtype and
    precision; f32 HIGHEST dots are split into the EXCEPTIONS and the rest."""
    where = _location_names(lowered_text)
    total = bf16 = highest = excepted = 0
    n_dots = 0
    offenders = []
    for line in lowered_text.splitlines():
        m = _DOT.search(line)
        if not m:
            continue
        n_dots += 1
        contracting, p_lhs, _, lhs, rhs, out, loc = m.groups()
        lhs_shape, lhs_dtype = _shape_and_dtype(lhs)
        _, rhs_dtype = _shape_and_dtype(rhs)
        out_shape, _ = _shape_and_dtype(out)
        dims = [int(d) for d in contracting.split(",") if d.strip()]
        flops = 2 * prod(out_shape) * prod(lhs_shape[d] for d in dims)
        total += flops
        if lhs_dtype == rhs_dtype == "bf16":
            bf16 += flops
        if "f32" in (lhs_dtype, rhs_dtype) and p_lhs == "HIGHEST":
            scope = where.get(loc, "")
            if any(name in scope for name in EXCEPTIONS):
                excepted += flops
            else:
                highest += flops
                offenders.append(scope[:200])
    return {"dots": n_dots, "flops": total, "bf16_share": bf16 / max(total, 1),
            "f32_highest_flops": highest, "exception_flops": excepted,
            "offenders": offenders}


def lowered_train_step(mixer: str, *, seq_len: int = 128, batch: int = 2, d_model: int = 64,
                       platform: str = "gpu", extra: tuple[str, ...] = ()) -> str:
    """The lowered text of a bf16 2-layer `mixer` model's jitted train step, lowered for
    `platform` ("gpu" -> cuda, "tpu") from this machine, the mixer on backend "xla": the
    policy is about the matmuls XLA compiles ("auto" there picks kernel libraries, whose
    matmuls sit inside custom calls this count cannot read)."""
    from models.config_check import load_config
    from models.lm import build_model
    from pallas_kernels.backends import lowering_for
    from training.loop import make_train_step
    from training.optim import make_optimizer

    cfg = load_config("configs/base.yaml", [
        f"model.mixers=[{mixer}]", "model.n_layers=2", f"model.d_model={d_model}",
        "model.n_heads=4", "model.vocab_size=64", "model.dtype=bfloat16",
        "model.precision=auto", f"model.max_len={seq_len}",
        f"model.mixer_args.{mixer}.backend=xla", *extra])
    model = build_model(cfg.model, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = make_optimizer(cfg.optim, 10)
    opt_state = jax.eval_shape(optimizer.init, params)
    train_step, _ = make_train_step(graphdef, optimizer)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    data = {"inputs": tokens, "targets": tokens,
            "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_)}
    params = jax.eval_shape(lambda p: p, params)
    with lowering_for(platform):     # the trace resolves "auto" as on `platform`
        lowered = train_step.trace(params, opt_state, data).lower(
            lowering_platforms=({"gpu": "cuda"}.get(platform, platform),))
    return lowered.as_text(debug_info=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixers", nargs="+", default=["gated_deltanet", "gla", "attn"])
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--platform", choices=("gpu", "tpu"), default="gpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    rows = []
    for mixer in a.mixers:
        summary = dot_summary(lowered_train_step(mixer, seq_len=a.seq_len, platform=a.platform))
        rows.append({"mixer": mixer, **summary})
        print(f"{mixer}: {summary['dots']} dots, {summary['flops'] / 1e6:.1f} MFLOP, bf16 "
              f"share {summary['bf16_share']:.3f}, f32 HIGHEST outside the exceptions "
              f"{summary['f32_highest_flops']}, in {EXCEPTIONS}: "
              f"{summary['exception_flops'] / max(summary['flops'], 1):.3f}", flush=True)
    lines = [f"bf16 train step (2 layers, d 64, batch 2, T {a.seq_len}, model.precision=auto), "
             f"lowered for {a.platform} from CPU, jax {jax.__version__} "
             f"(`{' '.join(['python benchmarks/precision.py', *(argv or sys.argv[1:])])}`)", "",
             "| mixer | dots | dot MFLOP | bf16-operand share | f32 HIGHEST share outside "
             "exceptions | exception share (triangular solve) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mixer']} | {r['dots']} | {r['flops'] / 1e6:.1f} | "
                     f"{r['bf16_share']:.3f} | {r['f32_highest_flops'] / max(r['flops'], 1):.3f}"
                     f" | {r['exception_flops'] / max(r['flops'], 1):.3f} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_cpu.md").write_text("\n".join(lines) + "\n")
    (out / "precision_cpu.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "offenders"} for r in rows], indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
