"""The knobs of scale: gradient accumulation (the same step as one big batch), activation
checkpointing (the same values, less memory kept for the backward pass), run dirs through
etils.epath (the bucket code path, run locally) and the eval metrics (perplexity, bits per
byte)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import nnx

from configs.schema import ConfigError
from models.config_check import load_config
from models.lm import REMAT_POLICIES, build_model, lm_loss
from training.checkpoint import Checkpointer
from training.loop import evaluate, make_train_step, train
from training.optim import make_optimizer
from training.paths import append_line, run_path

# Two mixer families (softmax attention and a chunked recurrence) in one small float32 model.
TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.vocab_size=64",
        "model.max_len=32", "model.dtype=float32", "model.mixers=[attn, gated_deltanet]",
        "model.mixer_args.gated_deltanet.chunk_size=8", "data.seq_len=32",
        "data.batch_size=8", "data.num_kv_pairs=4"]


def _model_and_batches(n_steps, seed=0, extra=()):
    cfg = load_config(None, TINY + list(extra))
    graphdef, state = nnx.split(build_model(cfg.model, seed=0))
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_steps):
        tokens = rng.integers(0, cfg.model.vocab_size, (8, 33))
        # Ragged masks: micro-batches score different numbers of tokens, so a per-micro-batch
        # mean (instead of the whole batch's token count) would give another loss.
        mask = (rng.random((8, 32)) < rng.uniform(0.2, 1.0, (8, 1))).astype(np.float32)
        batches.append({"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
                        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
                        "loss_mask": jnp.asarray(mask)})
    return cfg, graphdef, state.to_pure_dict(), batches


def _run_steps(cfg, graphdef, params, batches, **knobs):
    optimizer = make_optimizer(cfg.optim, 10)
    train_step, _ = make_train_step(graphdef, optimizer, **knobs)
    params = jax.tree.map(jnp.array, params)       # the step donates its inputs
    opt_state = optimizer.init(params)
    losses = []
    for batch in batches:
        params, opt_state, m = train_step(params, opt_state, batch)
        losses.append(float(m["loss"]))
    return np.array(losses), params


def test_grad_accumulation_equals_one_big_batch():
    cfg, graphdef, params, batches = _model_and_batches(3)
    big, p_big = _run_steps(cfg, graphdef, params, batches)
    for steps in (2, 4):
        acc, p_acc = _run_steps(cfg, graphdef, params, batches, grad_accum_steps=steps)
        # float32: the same sums in another order. Measured: losses within 1.2e-7 relative,
        # parameters after 3 AdamW steps within 3e-8.
        np.testing.assert_allclose(acc, big, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_big)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_grad_accumulation_config_checks():
    with pytest.raises(ConfigError, match="train.grad_accum_steps=3 must divide data.batch"):
        load_config(None, TINY + ["train.grad_accum_steps=3"])
    with pytest.raises(ConfigError, match="train.grad_accum_steps must be > 0"):
        load_config(None, TINY + ["train.grad_accum_steps=0"])
    with pytest.raises(ConfigError, match="train.remat"):
        load_config(None, TINY + ["train.remat=some"])


@pytest.fixture(scope="module")
def remat_setup():
    cfg, graphdef, params, batches = _model_and_batches(1, extra=["model.max_len=128"])
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 64, (4, 128)), jnp.int32)

    def loss(p, remat):
        logits, _ = nnx.merge(graphdef, p)(tokens, remat=remat)
        return lm_loss(logits[:, :-1], tokens[:, 1:], jnp.ones((4, 127)))[0]

    return params, loss


def _residual_bytes(loss, params, remat) -> int:
    """Bytes the forward pass keeps for the backward pass: the leaves of jax.vjp's closure."""
    res = jax.eval_shape(lambda p: jax.vjp(lambda q: loss(q, remat), p)[1], params)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(res))


def test_remat_same_values_and_less_kept_memory(remat_setup):
    params, loss = remat_setup
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref_v, ref_g = grad(params, "none")
    kept = {}
    for policy in REMAT_POLICIES:
        v, g = grad(params, policy)
        np.testing.assert_allclose(v, ref_v, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        kept[policy] = _residual_bytes(loss, params, policy)
    # Full remat keeps each block's input only; the dot policies keep matmul outputs
    # (dots_no_batch only those without a batch dimension). Measured at this size (bytes):
    # none 9.8e6, dots 3.4e6, dots_no_batch 2.3e6, full 0.6e6.
    assert kept["full"] < kept["dots_no_batch"] < kept["dots"] < kept["none"]
    assert kept["full"] * 4 < kept["none"]


def test_remat_compiled_memory(remat_setup):
    # XLA's own accounting of the compiled backward pass (memory_analysis). On this CPU the
    # buffer assignment reuses little memory between the forward and backward passes, so the
    # saving is much smaller than the residuals above (measured here: none 8.52 MB, full
    # 8.00 MB; 170.7 vs 164.5 MB for 4 layers of width 64 at batch 8 x 256); on a GPU / TPU
    # the kept activations are most of the temp memory. What holds everywhere: full remat
    # needs no more than none.
    params, loss = remat_setup
    temp = {}
    for policy in ("none", "full"):
        compiled = jax.jit(jax.grad(lambda p, r=policy: loss(p, r))).lower(params).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        temp[policy] = analysis.temp_size_in_bytes
    assert 0 < temp["full"] <= temp["none"]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_offload_remat_moves_the_kept_matmuls_to_host(remat_setup, platform):
    """train.remat=offload: lowered for a TPU / GPU from this CPU, the backward pass's kept
    matmul outputs are placed in pinned host memory (annotate_device_placement to
    pinned_host), and dots_no_batch, which keeps the same ones on the device, has none. (A CPU
    has no separate host memory: XLA drops the placements when compiling for it, and the
    values, checked in test_remat_same_values_and_less_kept_memory, are the same.)"""
    params, loss = remat_setup

    def lowered(policy):
        fn = jax.jit(jax.grad(lambda p: loss(p, policy)))
        return fn.trace(params).lower(lowering_platforms=(platform,)).as_text()

    assert lowered("offload").count("pinned_host") > 0
    assert lowered("dots_no_batch").count("pinned_host") == 0


def test_remat_refused_with_a_cache():
    cfg = load_config(None, TINY)
    model = build_model(cfg.model)
    with pytest.raises(ValueError, match="remat is for training"):
        model(jnp.zeros((1, 4), jnp.int32), cache=model.init_cache(1, 16), remat="full")
    with pytest.raises(ValueError, match="remat must be one of"):
        model(jnp.zeros((1, 4), jnp.int32), remat="most")


def test_evaluate_token_means_and_bits_per_byte():
    cfg, graphdef, params, batches = _model_and_batches(3)
    _, eval_step = make_train_step(graphdef, make_optimizer(cfg.optim, 10))
    batch_bytes = [100, 250, 7]
    out = evaluate(eval_step, params, batches, batch_bytes)
    # Independent: per-token cross-entropies of every batch, pooled.
    model = nnx.merge(graphdef, params)
    nll, correct = [], []
    for b in batches:
        logp = jax.nn.log_softmax(model(b["inputs"])[0], axis=-1)
        m = np.asarray(b["loss_mask"]) > 0
        gold = np.take_along_axis(np.asarray(logp), np.asarray(b["targets"])[..., None], -1)
        nll.append(-gold[..., 0][m])
        correct.append((np.asarray(logp).argmax(-1) == np.asarray(b["targets"]))[m])
    nll, correct = np.concatenate(nll), np.concatenate(correct)
    assert out["eval_loss"] == pytest.approx(nll.mean(), rel=1e-5)
    assert out["eval_ppl"] == pytest.approx(np.exp(nll.mean()), rel=1e-5)
    assert out["eval_acc"] == pytest.approx(correct.mean(), rel=1e-6)
    assert out["eval_bpb"] == pytest.approx(nll.sum() / np.log(2) / sum(batch_bytes), rel=1e-5)


def test_run_paths_go_through_epath(tmp_path):
    assert isinstance(run_path(tmp_path / "r"), epath.Path)
    assert str(run_path("gs://bucket/runs/a")) == "gs://bucket/runs/a"   # not made local
    ckpt = Checkpointer(str(tmp_path / "r"))
    assert isinstance(ckpt.directory, epath.Path)
    ckpt.close()
    # The bucket way of appending (read + rewrite) gives the same file as a local append.
    a, b = epath.Path(tmp_path / "a.jsonl"), epath.Path(tmp_path / "b.jsonl")
    for i in range(3):
        append_line(a, json.dumps({"step": i}))
        append_line(b, json.dumps({"step": i}), rewrite=True)
    assert a.read_text() == b.read_text() and len(a.read_text().splitlines()) == 3


@pytest.mark.slow
def test_training_with_accumulation_and_remat_resumes(tmp_path):
    """The loop with both knobs: same logged losses as without them, and it resumes."""
    base = TINY + ["train.log_every=1", "train.eval_every=1000", "train.eval_batches=1",
                   "train.progress_bar=false", "train.steps=4", "train.checkpoint_every=2",
                   "optim.warmup_steps=1"]

    def losses(run_dir):
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if "loss" in r}

    train(load_config(None, base + [f"run_dir={tmp_path / 'plain'}"]))
    knobs = ["train.grad_accum_steps=4", "train.remat=full"]
    cfg = load_config(None, base + knobs + [f"run_dir={tmp_path / 'knobs'}"])
    train(cfg, stop_at_step=2)
    train(cfg)
    plain, both = losses(tmp_path / "plain"), losses(tmp_path / "knobs")
    assert sorted(both) == [1, 2, 3, 4]
    np.testing.assert_allclose([both[s] for s in range(1, 5)],
                               [plain[s] for s in range(1, 5)], rtol=1e-5)


@pytest.mark.slow
def test_early_stop_at_the_first_eval_that_reaches_the_accuracy(tmp_path):
    """train.early_stop_acc: the run stops, with a checkpoint, at the first eval whose accuracy
    reaches it; the threshold is taken from a run without it (same seed, same evals)."""
    base = TINY + ["train.log_every=5", "train.eval_every=5", "train.eval_batches=4",
                   "train.progress_bar=false", "train.steps=40", "train.checkpoint_every=100",
                   "optim.warmup_steps=1", "optim.lr=1e-2"]

    def evals(run_dir):
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["eval_acc"] for r in recs if "eval_acc" in r}

    train(load_config(None, base + [f"run_dir={tmp_path / 'full'}"]))
    full = evals(tmp_path / "full")
    assert sorted(full) == list(range(5, 41, 5))
    threshold = max(full[s] for s in (30, 35, 40))   # reached by step 40
    assert threshold > 0, full
    expected = min(s for s in full if full[s] >= threshold)
    out = train(load_config(None, base + [f"run_dir={tmp_path / 'early'}",
                                          f"train.early_stop_acc={threshold}"]))
    assert out["step"] == expected
    assert sorted(evals(tmp_path / "early")) == list(range(5, expected + 1, 5))
    assert (tmp_path / "early" / "checkpoints" / str(expected)).is_dir()
    with pytest.raises(ConfigError, match="early_stop_acc"):
        load_config(None, base + ["train.early_stop_acc=1.5"])
