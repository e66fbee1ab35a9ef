"""Runs in a subprocess with 8 simulated CPU devices (tests/test_context_parallel.py): for each
mixer, a small float32 LM's logits and every parameter gradient on packed rows, on one device
and with the time axis sharded over a mesh's `sequence` axis; and whether the sharded step's
compiled HLO all-gathers any activation's whole time axis. Prints one JSON line.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/context_parallel_worker.py [train:N] [lower:P,..] [windows] [poison] \
            MIXERS@DATAxFSDPxSEQxTENSOR[:zigzag][:ring][:absorb][:unpacked][:tokenwise] ...

(train:N first: train.py's loop for three steps on one device and with mesh.sequence = N;
then lower:tpu,cuda: the sharded step lowered for those platforms; then windows: the
windowed attention op's cases; then poison: sharded ops on rows whose padding holds NaN.)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from models.config_check import load_config  # noqa: E402
from models.lm import build_model, lm_loss  # noqa: E402
from models.sharding import batch_sharding, lay_out_batch, make_mesh, use_mesh  # noqa: E402
from pallas_kernels.context_parallel import zigzag_order  # noqa: E402
from tests.parity import packed_segment_ids  # noqa: E402

B, T, D = 4, 64, 32
# Documents of row r: lengths crossing the 8-token shard boundaries, one starting exactly on a
# boundary (row 1: 16 + 8 = 24), and trailing padding across a boundary (row 3).
DOCS = [[5, 30, 29], [16, 8, 40], [64], [11, 21, 17]]


def segments() -> np.ndarray:
    return packed_segment_ids(DOCS, T)


# NSA's blocks scaled to the 64-token rows, so that selection, compression and the window
# each see keys the others do not (the defaults' 512-token window would cover the row).
# SWA's window shorter than the pieces (its halo one hop; window_cases covers longer ones),
# with sinks.
SMALL = {"nsa": ["cmp_block=8", "cmp_stride=4", "block_size=8", "block_count=3", "window=8",
                 "query_chunk=16"],
         "swa": ["window=6", "n_sinks=2"],
         # Persistent tokens (their conv tails and memory state open every document; MAG's
         # attention sees them as prefix keys beside every piece) and a window shorter than
         # the pieces.
         "titans": ["n_persistent=2"],
         "titans_mag": ["window=6"],
         # Segments shorter than the row, so the pipeline's pieces hold several and a
         # document's open segment crosses pieces; a larger inner learning rate, so that the
         # memory moves the logits (at 0.01 a carry restarted at every piece moved them by
         # 4e-7 only, its gradients by 30%).
         "titans_mac": ["segment_length=8", "chunk_size=4", "theta_max=0.3"]}


def model_for(mixers: list[str], extra: tuple[str, ...] = ()):
    small = [f"model.mixer_args.{m}.{kv}" for m in mixers for kv in SMALL.get(m, [])]
    small += list(extra)
    cfg = load_config(None, [f"model.d_model={D}", "model.n_heads=4", f"model.n_layers="
                             f"{len(mixers)}", f"model.mixers=[{','.join(mixers)}]",
                             "model.dtype=float32", "model.vocab_size=64",
                             f"model.max_len={T}", f"data.seq_len={T}", *small])
    return build_model(cfg.model, seed=0)


def loss_and_grads(graphdef, params, tokens, targets, mask, seg, positions=None,
                   remat="none"):
    def loss(params):
        logits, _ = nnx.merge(graphdef, params)(tokens, segment_ids=seg, positions=positions,
                                                remat=remat)
        return lm_loss(logits, targets, mask)[0], logits

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, logits, grads


def full_length_gathers(hlo: str) -> list[list[int]]:
    """Result shapes of the compiled HLO's all-gathers of floating-point arrays that hold the
    whole time axis ([.., T, ..] with at least 3 dims: activations, not [B, T] ids)."""
    shapes = []
    for line in hlo.splitlines():
        if " all-gather(" not in line and " all-gather-start(" not in line:
            continue
        result = line.split("=", 1)[1].split(" all-gather")[0]
        for dims in re.findall(r"(?:f32|bf16|f16)\[([\d,]+)\]", result):
            shape = [int(x) for x in dims.split(",") if x]
            if len(shape) >= 3 and T in shape:
                shapes.append(shape)
    return shapes


def relative(a, b, floor: float = 1e-30) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), floor))


def gradient_error(got, want) -> float:
    """The largest per-parameter relative error, each parameter's error measured against its
    own largest gradient or 1e-3 of the largest of all, whichever is larger: a parameter whose
    gradient is 1e-5 of the others' (Mamba-2's A_log here: 2e-7 against 7e-2) is a
    near-cancelled sum of terms the size of the others, and its float32 summation-order error
    is of their size."""
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    top = max(float(np.abs(np.asarray(b)).max()) for b in want)
    return max(relative(a, b, floor=1e-3 * top) for a, b in zip(got, want))


def check(mixers: list[str], sizes: tuple[int, ...], layout: str = "contiguous",
          attention: str = "all_gather", extra: tuple[str, ...] = (),
          packed: bool = True) -> dict:
    """packed=False: rows without documents (no segment ids; positions the token indices)."""
    model = model_for(mixers, extra)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    seg = segments() if packed else np.ones((B, T), np.int32)
    tokens = jnp.asarray(rng.integers(1, 64, (B, T)), jnp.int32)
    targets = jnp.asarray(rng.integers(1, 64, (B, T)), jnp.int32)
    mask = jnp.asarray(seg != 0, jnp.float32)
    seg = jnp.asarray(seg) if packed else None
    fn = jax.jit(loss_and_grads, static_argnums=0)
    one = fn(graphdef, params, tokens, targets, mask, seg)

    names = ("data", "fsdp", "sequence", "tensor")
    cfg = load_config(None, [f"mesh.{a}={n}" for a, n in zip(names, sizes)])
    mesh = make_mesh(cfg.mesh, jax.devices()[:int(np.prod(sizes))])
    # The zigzag layout reorders the rows on the host and adds their original positions.
    # (lay_out_batch finds the documents under "segment_ids", train.py's name for them.)
    rows = {"tokens": tokens, "targets": targets, "mask": mask}
    batch = lay_out_batch(rows if seg is None else {**rows, "segment_ids": seg}, mesh, layout)
    args = [jax.device_put(jnp.asarray(batch[k]), batch_sharding(mesh)) if k in batch else None
            for k in ("tokens", "targets", "mask", "segment_ids", "positions")]
    params_rep = jax.device_put(params, NamedSharding(mesh, P()))
    with use_mesh(mesh, layout, attention):
        lowered = fn.trace(graphdef, params_rep, *args).lower()
    compiled = lowered.compile()
    got = compiled(params_rep, *args)
    if layout == "zigzag":        # logits back in the original order
        order = zigzag_order(T, sizes[2])
        got = (got[0], np.asarray(got[1])[:, np.argsort(order)], got[2])
    return {"loss": relative(got[0], one[0]), "logits": relative(got[1], one[1]),
            "grads": gradient_error(got[2], one[2]),
            "zero_grads": sum(int(np.abs(np.asarray(g)).max() == 0)
                              for g in jax.tree.leaves(one[2])),
            "gathers": full_length_gathers(compiled.as_text())}


def train_curves(out_dir: Path, sequence: int) -> dict:
    """Three training steps of train.py's loop (packed text, [attn, gated_deltanet]) on one
    device or with mesh.sequence = `sequence`: the logged losses and gradient norms."""
    from training.loop import train

    run_dir = out_dir / f"train_seq{sequence}"
    cfg = load_config(None, [
        f"run_dir={run_dir}", "model.d_model=32", "model.n_heads=4", "model.n_layers=2",
        "model.mixers=[attn,gated_deltanet]", "model.dtype=float32", "model.vocab_size=64",
        "model.max_len=32", "data.seq_len=32", "data.batch_size=4", "data.num_kv_pairs=4",
        "train.steps=3", "train.log_every=1", "train.eval_every=3", "train.eval_batches=1",
        "train.progress_bar=false", "optim.warmup_steps=1", "mesh.data=1",
        f"mesh.sequence={sequence}"])
    train(cfg, devices=jax.devices()[:sequence])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {key: [r[key] for r in rows if "loss" in r] for key in ("loss", "grad_norm")}


# (layout, window, sinks, packed): halos of one hop (window - 1 <= piece length) and of
# several pieces (20 - 1 > 4), sinks inside the halo and far before it.
WINDOW_CASES = [("contiguous", 3, 0, True), ("zigzag", 3, 2, True), ("zigzag", 20, 3, True),
                ("contiguous", 2, 4, True), ("zigzag", 5, 1, False)]


def window_cases() -> dict:
    """The attention op with a window (context_parallel/window.py) on mesh (1, 1, 8, 1), 8
    pieces of 8 tokens (contiguous) or 16 of 4 (zigzag), GQA, packed rows: the largest
    relative error of the output and of the q / k / v gradients against one device, per
    case."""
    from pallas_kernels.attention import attention
    from pallas_kernels.context_parallel import shard_sequence

    mesh = make_mesh(load_config(None, ["mesh.data=1", "mesh.sequence=8"]).mesh)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(B, T, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, T, 2, 8)), jnp.float32) for _ in range(2))
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    out = {}
    for layout, window, sinks, packed in WINDOW_CASES:
        seg = jnp.asarray(segments()) if packed else None

        def f(q, k, v, seg, ct, window=window, sinks=sinks):
            o = attention(q, k, v, window=window, n_sinks=sinks, backend="xla",
                          segment_ids=seg)
            return jnp.sum(o * ct), o

        grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
        order = np.arange(T) if layout == "contiguous" else zigzag_order(T, 8)
        one = grads(q, k, v, seg, cotangent)
        lay = lambda x, order=order: None if x is None else x[:, order]  # noqa: E731
        with shard_sequence(mesh, layout):
            got = jax.jit(grads)(lay(q), lay(k), lay(v), lay(seg), lay(cotangent))
        back = np.argsort(order)
        out[f"{layout}:{window}:{sinks}:{packed}"] = {
            "values": relative(np.asarray(got[0][1])[:, back], one[0][1]),
            "grads": max(relative(np.asarray(a)[:, back], b) for a, b in zip(got[1], one[1]))}
    return out


def poison_cases() -> dict:
    """Sharded ops on packed rows whose padding holds NaN (row 3's trailing padding crosses
    pieces in both layouts), mesh (1, 1, 8, 1): the linear ops' summaries, attention by
    all-gather, ring and window halo (with sinks), a short conv's halo. Per op and layout:
    whether the outputs at real tokens and all input gradients are finite, and their largest
    relative errors against one device on the same poisoned inputs (whose padding gradients
    are 0: the ops zero padding before it meets anything)."""
    from layers.conv import ShortConv
    from pallas_kernels.attention import attention
    from pallas_kernels.context_parallel import shard_sequence
    from pallas_kernels.gated_delta_rule import gated_delta_rule
    from pallas_kernels.gla import gla
    from pallas_kernels.linear_attention import linear_attention

    mesh = make_mesh(load_config(None, ["mesh.data=1", "mesh.sequence=8"]).mesh)
    rng = np.random.default_rng(2)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    q, k, v = normal(B, T, 2, 8), normal(B, T, 2, 8), normal(B, T, 2, 8)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    g = -jax.nn.softplus(normal(B, T, 2) - 3.0)                 # gates in log space
    gk = -jax.nn.softplus(normal(B, T, 2, 8) - 3.0)
    beta = jax.nn.sigmoid(normal(B, T, 2))
    feature = lambda x: jax.nn.elu(x) + 1.0  # noqa: E731
    conv = ShortConv(16, 4, dtype=jnp.float32, rngs=nnx.Rngs(0))
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    linear = dict(backend="xla", chunk_size=4)
    cases = {   # name: (op(args, seg), args, softmax attention's exchange)
        "gated_delta_rule": (lambda a, s: first(gated_delta_rule(*a, segment_ids=s, **linear)),
                             (q, k, v, g, beta), "all_gather"),
        "gla": (lambda a, s: first(gla(*a, segment_ids=s, **linear)), (q, k, v, gk),
                "all_gather"),
        "linear_attention": (lambda a, s: first(linear_attention(
            *a, normalize=True, segment_ids=s, **linear)), (feature(q), feature(k), v),
            "all_gather"),
        "attention": (lambda a, s: attention(*a, backend="xla", segment_ids=s), (q, k, v),
                      "all_gather"),
        "attention_ring": (lambda a, s: attention(*a, backend="xla", segment_ids=s),
                           (q, k, v), "ring"),
        "attention_window": (lambda a, s: attention(*a, window=5, n_sinks=2, backend="xla",
                                                    segment_ids=s), (q, k, v), "all_gather"),
        "short_conv": (lambda a, s: conv(a[0], segment_ids=s)[0], (normal(B, T, 16),),
                       "all_gather"),
    }
    seg = jnp.asarray(segments())
    pad = np.asarray(seg) == 0
    out = {}
    for name, (op, args, exchange) in cases.items():
        poisoned = tuple(jnp.where(jnp.asarray(pad).reshape(pad.shape + (1,) * (a.ndim - 2)),
                                   jnp.nan, a) for a in args)
        cotangent = normal(*jax.eval_shape(lambda a, op=op: op(a, seg), args).shape)

        def loss(args, seg, ct, op=op):
            o = op(args, seg)
            return jnp.sum(o * ct), o

        grads = jax.value_and_grad(loss, has_aux=True)
        (_, one_o), one_g = jax.jit(grads)(poisoned, seg, cotangent)
        for layout in ("contiguous", "zigzag"):
            order = np.arange(T) if layout == "contiguous" else zigzag_order(T, 8)
            back = np.argsort(order)
            with shard_sequence(mesh, layout, exchange):
                (_, o), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(
                    tuple(a[:, order] for a in poisoned), seg[:, order], cotangent[:, order])
            # Outputs at real tokens (a conv's padding outputs read the padding, as on one
            # device: the layers after it zero them); gradients everywhere.
            o, g = np.asarray(o)[:, back][~pad], [np.asarray(x)[:, back] for x in g]
            out[f"{name}:{layout}"] = {
                "finite": bool(np.isfinite(o).all() and all(np.isfinite(x).all() for x in g)),
                "values": relative(o, np.asarray(one_o)[~pad]),
                "grads": max(relative(a, b) for a, b in zip(g, one_g))}
    return out


# The lowered step's mixers: one of each exchange (state summaries, K / V, MLA's latents,
# halos of convs and of a window with sinks, NSA's whole rows, MAC's pipeline).
LOWERED = ["attn", "gated_deltanet", "swa", "mla", "cca", "nsa", "titans_mac"]


def lower_sharded_step(platforms: list[str]) -> dict:
    """The sharded loss-and-gradient step of a model of LOWERED (mesh (1, 1, 8, 1), zigzag,
    full attention by ring, train.remat=offload) lowered for each platform ("tpu", "cuda")
    from this CPU, without running: its partition count, how many all-gathers and collective
    permutes (ring steps, halos) the module holds, and how many values it places in pinned
    host memory (the offloaded remat)."""
    graphdef, params = nnx.split(model_for(LOWERED))
    mesh = make_mesh(load_config(None, ["mesh.data=1", "mesh.sequence=8"]).mesh)
    spec = lambda dtype: jax.ShapeDtypeStruct((B, T), dtype,  # noqa: E731
                                              sharding=batch_sharding(mesh))
    args = [spec(jnp.int32), spec(jnp.int32), spec(jnp.float32), spec(jnp.int32),
            spec(jnp.int32)]
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, P())), params)
    fn = jax.jit(loss_and_grads, static_argnums=(0, 7))
    out = {}
    for platform in platforms:
        with use_mesh(mesh, "zigzag", "ring"):
            text = fn.trace(graphdef, params, *args, "offload").lower(
                lowering_platforms=(platform,)).as_text()
        partitions = re.search(r"mhlo.num_partitions = (\d+)", text)
        out[platform] = {"partitions": int(partitions.group(1)) if partitions else 1,
                         "all_gathers": text.count("all_gather"),
                         "permutes": text.count("collective_permute"),
                         "offloaded": text.count("pinned_host")}
    return out


def main(argv: list[str]) -> None:
    out = {"devices": len(jax.devices())}
    if argv and argv[0].startswith("train:"):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            sequence = int(argv.pop(0).split(":")[1])
            out["train"] = {"1": train_curves(Path(tmp), 1),
                            str(sequence): train_curves(Path(tmp), sequence)}
    if argv and argv[0].startswith("lower:"):
        out["lowered"] = lower_sharded_step(argv.pop(0).split(":")[1].split(","))
    if argv and argv[0] == "windows":
        argv.pop(0)
        out["windows"] = window_cases()
    if argv and argv[0] == "poison":
        argv.pop(0)
        out["poison"] = poison_cases()
    for case in argv:
        mixers, rest = case.split("@")
        sizes, *options = rest.split(":")
        layout = "zigzag" if "zigzag" in options else "contiguous"
        attention = "ring" if "ring" in options else "all_gather"
        # absorb: MLA in its absorbed form (multi-query attention over the latents).
        extra = ("model.mixer_args.mla.absorb=always",) if "absorb" in options else ()
        # tokenwise: MAC's segments not a multiple of the memory's chunks (its token-by-token
        # form).
        extra += ("model.mixer_args.titans_mac.chunk_size=3",) if "tokenwise" in options else ()
        out[case] = check(mixers.split(","), tuple(int(x) for x in sizes.split("x")), layout,
                          attention, extra, packed="unpacked" not in options)
        print(case, json.dumps(out[case])[:400], file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
