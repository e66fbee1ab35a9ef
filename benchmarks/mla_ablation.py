"""Why MLA stalls on the recall protocol (benchmarks/recall.py) where attention recalls: MLA
with one part of its key / value path changed at a time, trained on the same MQAR setting,
with where the trained heads look.

    python benchmarks/mla_ablation.py                       # 6 variants x seeds 0-3, lr 1e-3
    python benchmarks/mla_ablation.py --variants mla values_from_x --seeds 0 1

Variants (training-only subclasses of layers/mla.py's MLA, computing its expanded form; they
refuse a decode cache and are not registered mixers). Each changes one thing of MLA
(V2 Sec. 2.1.2-2.1.3: [k_nope_i ; v_i] = RMSNorm(x W_dkv) W_ukv_i, one RoPE key for all heads):

- ``attention``: not MLA: recall.py's ``attn`` family, the reference the probe is read against.
- ``mla``: none (the same numbers as MLA; tests/test_benchmark_suite.py checks it).
- ``values_from_x``: v_i = x W_v_i, per head straight from x, as attention's values; the keys
  still come from the latent.
- ``keys_from_x``: k_nope_i = x W_k_i straight from x; the values still from the latent.
- ``split_latents``: values from a second normalized latent RMSNorm(x W_dv) of the same rank,
  so keys and values no longer share one.
- ``no_norm``: the latent without its RMSNorm.
- ``per_head_rope``: one RoPE key per head, x W_kr_i, instead of one shared by all heads.

The probe, on one held-out batch of the trained model (eager, softmax probabilities of the two
layers): ``prev``: layer 1's attention from a pair's value token to its key (position t - 1:
the previous-token head an induction circuit needs), per head; ``value``: layer 2's attention
from a query to the queried pair's value position (what it must copy), per head. Attention's
heads are the reference (the ``attention`` row); a uniform head gives ~0.26 and ~0.05.

Each (variant, seed) trains in its own process as in recall.py; the recall settings (steps,
batch, early stop, sizes) are recall.py's, passed through (``--steps``, ``--batch``, ...).
Prints a markdown table and saves .md / .json under --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from common import run_child, save_results  # noqa: E402

VARIANTS = {
    "attention": "softmax attention (the recall family 'attn'), for reference",
    "mla": "MLA as it is",
    "values_from_x": "values straight from x (keys from the latent)",
    "keys_from_x": "nope keys straight from x (values from the latent)",
    "split_latents": "separate normalized latents for keys and values",
    "no_norm": "latent without RMSNorm",
    "per_head_rope": "one RoPE key per head",
}
_PROBS: list | None = None   # set to a list to record softmax probabilities (eager calls only)


def variant_class(name: str):
    """The MLA subclass of one variant (module docstring)."""
    import jax.numpy as jnp
    from flax import nnx

    from layers.attention import attention_mask
    from layers.mla import MLA
    from layers.norm import RMSNorm
    from layers.rope import apply_rope
    from pallas_kernels.masks import packed_visibility

    if name not in VARIANTS or name == "attention":
        raise ValueError(f"no MLA class for variant '{name}' (MLA variants: "
                         f"{', '.join(v for v in VARIANTS if v != 'attention')})")

    class Ablation(MLA):
        variant = name

        def __init__(self, cfg, args, *, rngs):
            super().__init__(cfg, args, rngs=rngs)
            lin = dict(use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
            h, d = self.n_heads, cfg.d_model
            if name == "values_from_x":
                self.w_v = nnx.Linear(d, h * self.v_dim, **lin)
            elif name == "keys_from_x":
                self.w_k = nnx.Linear(d, h * self.nope_dim, **lin)
            elif name == "split_latents":
                self.w_dv = nnx.Linear(d, self.kv_lora_rank, **lin)
                self.v_norm = RMSNorm(self.kv_lora_rank, eps=cfg.norm_eps)
            elif name == "per_head_rope":
                self.w_kr = nnx.Linear(d, h * self.rope_dim, **lin)

        def __call__(self, x, *, positions, cache=None, segment_ids=None):
            if cache is not None:
                raise ValueError(f"MLA ablation '{name}' is training-only: no decode cache")
            b, t, _ = x.shape
            h, n, p = self.n_heads, self.nope_dim, self.rope_dim
            q_nope, q_rope = self._queries(x, positions)
            c_raw, k_rope = jnp.split(self.wkv_a(x), [self.kv_lora_rank], axis=-1)
            c_kv = c_raw if name == "no_norm" else self.kv_norm(c_raw)
            w = self.wkv_b[...].astype(c_kv.dtype)
            k_nope = jnp.einsum("bsr,rhn->bshn", c_kv, w[..., :n])
            v = jnp.einsum("bsr,rhv->bshv", c_kv, w[..., n:])
            if name == "values_from_x":
                v = self.w_v(x).reshape(b, t, h, self.v_dim)
            elif name == "keys_from_x":
                k_nope = self.w_k(x).reshape(b, t, h, n)
            elif name == "split_latents":
                v = jnp.einsum("bsr,rhv->bshv", self.v_norm(self.w_dv(x)), w[..., n:])
            if name == "per_head_rope":
                k_rope = apply_rope(self.w_kr(x).reshape(b, t, h, p), positions, self.rope_theta)
            else:
                k_rope = jnp.broadcast_to(apply_rope(k_rope[:, :, None], positions,
                                                     self.rope_theta), (b, t, h, p))
            q = jnp.concatenate([q_nope, q_rope], axis=-1)
            k = jnp.concatenate([k_nope, k_rope], axis=-1)
            mask = (attention_mask(positions, positions, self.window, self.n_sinks)
                    if segment_ids is None else packed_visibility(segment_ids, self.window,
                                                                  self.n_sinks))
            o = _attend(q, k, v, mask, (n + p) ** -0.5)   # MLA's scale: (N + P)^-0.5
            return self.out(o.reshape(b, t, h * self.v_dim)), None

    Ablation.__name__ = Ablation.__qualname__ = f"MLAAblation_{name}"
    return Ablation


def _attend(q, k, v, mask, scale):
    """pallas_kernels/attention/xla.py's softmax_attention, recording its probabilities
    [B, H, T, S] while probe() runs (both the variants and layers.attention call it then)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.attention.xla import softmax_attention

    if _PROBS is not None:   # set by probe() around an eager call only
        keys = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)   # GQA groups -> query heads
        scores = jnp.einsum("bthd,bshd->bhts", q, keys, preferred_element_type=jnp.float32)
        _PROBS.append(jax.nn.softmax(jnp.where(mask[:, None], scores * scale, -jnp.inf), -1))
    return softmax_attention(q, k, v, mask, scale)


def probe(model, batch, n_pairs: int) -> dict:
    """Layer 1's previous-token attention at the pairs' values, layer 2's attention from the
    queries to the queried values: per head, on one batch (module docstring)."""
    import jax.numpy as jnp
    import numpy as np

    import layers.attention

    global _PROBS
    _PROBS, plain = [], layers.attention.softmax_attention
    layers.attention.softmax_attention = _attend   # attention's layers record too
    try:
        model(jnp.asarray(batch["inputs"]))
        first, second = (np.asarray(p) for p in _PROBS[:2])   # [B, H, T, S] each
    finally:
        _PROBS, layers.attention.softmax_attention = None, plain
    inputs, mask = np.asarray(batch["inputs"]), np.asarray(batch["loss_mask"])
    prev = np.mean([first[:, :, 2 * i + 1, 2 * i] for i in range(n_pairs)], axis=(0, 1))
    on_value = []
    for row in range(inputs.shape[0]):
        keys = list(inputs[row, 0:2 * n_pairs:2])
        for qp in np.nonzero(mask[row])[0]:
            on_value.append(second[row, :, qp, 2 * keys.index(inputs[row, qp]) + 1])
    return {"prev": [round(float(z), 3) for z in prev],
            "value": [round(float(z), 3) for z in np.mean(on_value, axis=0)]}


def run_one(a, variant: str, seed: int) -> dict:
    """Train one (variant, seed) with recall.py's settings in this process, probe it."""
    import recall

    from data.pipeline import make_eval_batches
    from layers.mla import MLAArgs
    from layers.registry import MIXERS, MixerSpec
    from models.config_check import load_config
    from training.checkpoint import restore_for_inference
    from training.loop import train

    registered = MIXERS["mla"]
    family = "attn" if variant == "attention" else "mla"
    _, config, mixers, _ = recall.parse_family(family)
    n_heads = load_config(recall.CONFIGS / config, []).model.n_heads
    try:   # the variant stands in for "mla" in this process while it trains and is probed
        if variant not in ("mla", "attention"):   # those two train the registered mixers
            MIXERS["mla"] = MixerSpec(variant_class(variant), MLAArgs())
        with tempfile.TemporaryDirectory(prefix=f"mla_ablation_{variant}_") as run_dir:
            over = recall.overrides_for(a, mixers or ("mla",), 64, n_heads, run_dir, a.lr,
                                        seed)
            cfg = load_config(recall.CONFIGS / config, over)
            print(f"== {variant}, seed {seed}, lr {a.lr:g}", flush=True)
            t0 = time.perf_counter()
            final = train(cfg)
            train_s = time.perf_counter() - t0
            if variant != "attention":   # the probe reads the variant class's softmax
                MIXERS["mla"] = MixerSpec(variant_class(variant), MLAArgs())
            _, model, _ = restore_for_inference(run_dir)
    finally:
        MIXERS["mla"] = registered
    batch = make_eval_batches(cfg.data, cfg.model.vocab_size, 1)[0]
    heads = probe(model, batch, a.kv_pairs)
    print(f"   {variant} seed {seed}: eval acc {final['eval_acc']:.3f} at step "
          f"{final['step']}, prev {heads['prev']}, value {heads['value']}", flush=True)
    return {"variant": variant, "seed": seed, "lr": a.lr, "eval_acc": final["eval_acc"],
            "steps": final["step"], "train_s": train_s, **heads}


def _table_row(variant: str, rs: list[dict]) -> str:
    best = lambda key: " / ".join(f"{max(r[key]):.2f}" for r in rs)   # the best head, per seed
    accs = " / ".join(f"{r['eval_acc']:.3f}" for r in rs)
    solved = sum(r["eval_acc"] >= 0.9 for r in rs)
    steps = statistics.median(r["steps"] for r in rs)
    return (f"| {variant} | {VARIANTS[variant]} | {accs} | {solved} of {len(rs)} | {steps:.0f} | "
            f"{best('prev')} | {best('value')} |")


TABLE_HEAD = ["| variant | change | held-out acc per seed | solved (>= 0.9) | median steps | "
              "layer 1 previous-token attention, best head per seed | layer 2 attention on "
              "the value, best head per seed |", "|---|---|---|---|---|---|---|"]


def build_parser() -> argparse.ArgumentParser:
    import recall

    p = recall.build_parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--lr", type=float, default=1e-3)
    p.set_defaults(seeds=[0, 1, 2, 3])
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--families", "--widths", "--lrs", "--config_lr", "--resume"):
        if flag in argv:
            raise SystemExit(f"error: {flag} is recall.py's; mla_ablation.py sweeps --variants "
                             "and --seeds at one --lr")
    a = build_parser().parse_args(argv)
    if not a.early_stop:
        a.early_stop = None
    if a.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1; got {a.jobs}")
    if a._row is not None:
        variant, seed = a._job.split("@")
        Path(a._row).write_text(json.dumps(run_one(a, variant, int(seed))))
        return 0
    from common import strip_flags

    jobs = [(v, s) for v in a.variants for s in a.seeds]
    t_start = time.perf_counter()
    if a.in_process:
        rows = [run_one(a, v, s) for v, s in jobs]
    else:
        child_argv = strip_flags(argv, ("--variants", "--seeds", "--jobs"))
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            rows = list(pool.map(lambda j: run_child(
                __file__, [*child_argv, "--_job", f"{j[0]}@{j[1]}"], f"{j[0]} seed {j[1]}",
                capture=a.jobs > 1), jobs))
        if any(r is None for r in rows):
            return 1
    import jax

    lines = [f"MLA ablations on the recall protocol: {a.kv_pairs} pairs, {a.seq_len} tokens, "
             f"vocab {a.vocab}, d_model 64, <= {a.steps} steps at batch {a.batch}, early stop "
             f"{a.early_stop}, lr {a.lr:g}, seeds {' '.join(map(str, a.seeds))}; probe: layer "
             f"1 previous-token attention at the values / layer 2 attention on the queried "
             f"value (per head in the .json); {jax.default_backend()} ({platform.machine()})"
             f", {(time.perf_counter() - t_start) / 60:.0f} min wall "
             f"(`python benchmarks/mla_ablation.py {' '.join(argv)}`)", "", *TABLE_HEAD]
    for v in a.variants:
        lines.append(_table_row(v, [r for r in rows if r["variant"] == v]))
    save_results(a.out, f"mla_ablation_{jax.default_backend()}", lines,
                 {"settings": {k: v for k, v in vars(a).items() if not k.startswith("_")},
                  "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
