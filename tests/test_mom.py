"""Mixture-of-Memories: the packed (sorted-by-memory) path against the masked reference (values,
gradients, cached prefill), decode parity in both dtypes, the dispatch plan, the router, skipped
memories left unchanged, the constant-size cache, the balance loss in the training objective,
and config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import ConfigError
from layers.mom import MoM, MoMArgs, packed_length, plan_dispatch
from models import build_model
from models.config_check import load_config
from tests.parity import assert_decode_parity
from training.loop import make_train_step

B, T, D = 2, 20, 32


def _model_cfg(dtype="float32"):
    return load_config(None, [f"model.d_model={D}", "model.n_heads=2", "model.max_len=64",
                              "model.vocab_size=64", f"model.dtype={dtype}"]).model


@functools.cache
def _mixer(dtype="float32", dispatch="auto", backend="auto", shared=True, seed=0):
    # chunk 8 with T = 20: the op crosses chunk boundaries; K = 16, V = 24.
    args = MoMArgs(chunk_size=8, expand_v=1.5, dispatch=dispatch, backend=backend,
                   shared_memory=shared)
    return MoM(_model_cfg(dtype), args, rngs=nnx.Rngs(seed))


def _pos(t):
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))


@functools.cache
def _value_and_grad(dispatch, backend, shared):
    """Jitted (params, x, ct) -> (y, d params, d x) of sum(y * ct), on one set of params."""
    gd, _ = nnx.split(_mixer(backend=backend, shared=shared), nnx.Param)

    def loss(p, x, ct):
        y, _ = nnx.merge(gd, p)(x, positions=_pos(T), dispatch=dispatch)
        return jnp.sum(y * ct), y

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def test_packed_matches_masked_reference_with_gradients(shared=True):
    _, params = nnx.split(_mixer(shared=shared), nnx.Param)
    x = jax.random.normal(jax.random.key(2), (B, T, D))
    ct = jax.random.normal(jax.random.key(4), (B, T, D))
    (gp_r, gx_r), y_r = _value_and_grad("masked", "reference", shared)(params, x, ct)
    (gp_p, gx_p), y_p = _value_and_grad("packed", "auto", shared)(params, x, ct)
    np.testing.assert_allclose(y_p, y_r, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gx_p, gx_r, rtol=1e-5, atol=1e-7)
    flat_p, flat_r = jax.tree.leaves(gp_p), jax.tree.leaves(gp_r)
    assert len(flat_p) == len(flat_r) == 11
    for a, r in zip(flat_p, flat_r):
        assert np.max(np.abs(r)) > 0   # every parameter gets a gradient (router included)
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(r))))


def test_packed_prefill_from_cache_matches_masked():
    # Cached prefill: states enter the packed stream as write slots and leave as read slots.
    # (Without the shared memory, so that both settings meet the reference.)
    mixer = _mixer(shared=False)
    gd, state = nnx.split(mixer)
    call = jax.jit(lambda st, x, c, mode: nnx.merge(gd, st)(x, positions=_pos(x.shape[1]),
                                                             cache=c, dispatch=mode),
                   static_argnums=3)
    x = jax.random.normal(jax.random.key(5), (B, T, D))
    cache = mixer.init_cache(B, 64, jnp.float32)
    cache = cache.replace(states=0.3 * jax.random.normal(jax.random.key(6),
                                                         cache.states.shape))
    y_m, c_m = call(state, x, cache, "masked")
    y_p, c_p = call(state, x, cache, "packed")
    np.testing.assert_allclose(y_p, y_m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(c_p.states, c_m.states, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(c_m.states - cache.states))) > 1e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_decode_parity(dtype):
    mixer = _mixer("float32" if dtype == jnp.float32 else "bfloat16", dispatch="packed")
    x = jax.random.normal(jax.random.key(1), (B, T, D)).astype(dtype)
    prefill, chunk = (11, 9) if dtype == jnp.float32 else (5, 7)
    assert_decode_parity(mixer, x, prefill=prefill, chunk=chunk, max_len=32, dtype=dtype)


def test_dispatch_plan_is_a_sort_by_memory():
    rng = np.random.default_rng(0)
    n_mem, chunk, t, a = 5, 4, 9, 3
    # Skewed routing: memory 0 gets every token, memory 3 none.
    idx = np.stack([np.stack([np.r_[0, rng.choice([1, 2, 4], a - 1, replace=False)]
                              for _ in range(t)]) for _ in range(2)])
    plan = jax.tree.map(np.asarray, plan_dispatch(jnp.asarray(idx), n_mem, chunk, 2, 1))
    assert plan.token.shape == (2, packed_length(t, a, n_mem, chunk, 3))
    for b in range(2):
        mem = idx[b].reshape(-1)
        assert len(set(plan.slot[b])) == t * a                      # one slot each
        np.testing.assert_array_equal(plan.token[b, plan.slot[b]], np.arange(t * a) // a)
        np.testing.assert_array_equal(plan.count[b], np.bincount(mem, minlength=n_mem))
        assert np.all(plan.start[b] % chunk == 0) and np.all(plan.end[b] % chunk == 0)
        for m in range(n_mem):
            slots = plan.slot[b][mem == m]
            # After 2 write slots, in time order, contiguous; its chunks belong to m.
            np.testing.assert_array_equal(slots, plan.start[b, m] + 2 + np.arange(len(slots)))
            assert plan.end[b, m] - plan.start[b, m] >= len(slots) + 4
            chunks = np.arange(plan.start[b, m], plan.end[b, m], chunk) // chunk
            assert np.all(plan.chunk_mem[b, chunks] == m)


def test_router_weights():
    mixer = _mixer()
    x = jax.random.normal(jax.random.key(7), (B, T, D))
    idx, w, probs = mixer.route(x)
    assert idx.shape == w.shape == (B, T, 3) and probs.shape == (B, T, 4)
    np.testing.assert_allclose(jnp.sum(w[..., :2], -1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(idx[..., 2]) == 4) and np.all(np.asarray(w[..., 2]) == 1.0)
    assert np.all(np.asarray(idx[..., 0] != idx[..., 1]))
    top2 = np.sort(np.argsort(-np.asarray(probs), -1)[..., :2], -1)
    np.testing.assert_array_equal(np.sort(np.asarray(idx[..., :2]), -1), top2)
    # Balance loss M sum_m f_m P_m, f_m the share of the top-k assignments that go to m.
    f = np.bincount(np.asarray(idx[..., :2]).reshape(-1), minlength=4) / (B * T * 2)
    want = 4 * np.sum(f * np.asarray(probs).mean((0, 1)))
    assert float(mixer.balance_loss(x)) == pytest.approx(want, rel=1e-5)


def test_unrouted_memories_are_unchanged():
    # Property, on the masked reference: over a token not routed to a memory, that memory's
    # state stays the same (no write, no decay); the routed ones do change. (Not bit for bit:
    # the T = 8 and T = 9 programs round their projections' matmuls differently.)
    mixer = _mixer(backend="reference", dispatch="masked")
    gd, state = nnx.split(mixer)
    call = jax.jit(lambda st, x: nnx.merge(gd, st)(
        x, positions=_pos(x.shape[1]), cache=mixer.init_cache(B, 64, jnp.float32))[1].states)
    for seed in range(4):
        x = 2.0 * jax.random.normal(jax.random.key(10 + seed), (B, 9, D))
        before, after = np.asarray(call(state, x[:, :8])), np.asarray(call(state, x))
        idx = np.asarray(mixer.route(x)[0][:, 8])                    # [B, A] at token 8
        for b in range(B):
            for m in range(mixer.n_states):
                diff = np.max(np.abs(before[b, m] - after[b, m])) / np.max(np.abs(after[b, m]))
                assert (diff < 1e-6) if m not in idx[b] else (diff > 1e-3), (seed, b, m, diff)


def test_cache_bytes_do_not_grow_with_length():
    mixer = _mixer()
    small, large = mixer.init_cache(1, 1024, jnp.bfloat16), mixer.init_cache(1, 16384,
                                                                              jnp.bfloat16)
    assert small.nbytes == large.nbytes and small.states.dtype == jnp.float32
    # (4 routed + 1 shared) x 2 heads x K 16 x V 24 float32, bf16 conv tails (3 steps) of q
    # (2 x 16 channels) and x (32 channels).
    assert small.nbytes == 5 * 2 * 16 * 24 * 4 + 3 * (32 + 32) * 2
    assert _mixer(shared=False).init_cache(1, 8, jnp.bfloat16).nbytes == (
        4 * 2 * 16 * 24 * 4 + 3 * (32 + 32) * 2)


TINY = ["model.d_model=32", "model.n_heads=2", "model.vocab_size=32", "model.max_len=32",
        "model.n_layers=1", "model.mixer_args.mom.chunk_size=8", "model.dtype=float32",
        "data.seq_len=16", "data.num_kv_pairs=2"]


def test_balance_loss_joins_the_training_objective():
    tokens = jax.random.randint(jax.random.key(8), (4, 17), 0, 32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": jnp.ones((4, 16), jnp.float32)}

    def model(weight):
        cfg = load_config("configs/mom.yaml",
                          TINY + [f"model.mixer_args.mom.balance_loss_weight={weight}"])
        return build_model(cfg.model, seed=0)

    lm = model(0.5)
    h = lm.blocks[0].mixer_norm(lm.embed(batch["inputs"]))    # the MoM layer's input
    balance = float(lm.blocks[0].mixer.balance_loss(h))
    # Weight 0: the layer adds exactly nothing, so the objective is the LM loss (eval_step's).
    assert float(model(0.0).blocks[0].mixer.aux_loss(h)) == 0.0
    graphdef, state = nnx.split(lm)
    params = state.to_pure_dict()
    opt = optax.sgd(0.0)
    train_step, eval_step = make_train_step(graphdef, opt)
    ce, _, count = eval_step(params, batch)
    lm_only = float(ce / count)
    m = jax.device_get(train_step(params, opt.init(params), batch)[2])
    assert {"loss", "lm_loss", "aux_loss", "acc", "grad_norm"} <= set(m)   # all get logged
    assert balance > 0.5 and m["aux_loss"] == pytest.approx(0.5 * balance, rel=1e-5)
    assert m["lm_loss"] == pytest.approx(lm_only, rel=1e-6)
    assert m["loss"] - lm_only == pytest.approx(0.5 * balance, rel=1e-4)


@pytest.mark.parametrize("override,pattern", [
    ("model.mixer_args.mom.top_k=5", r"model.mixer_args.mom.top_k=5 must be in \[1, "
                                     r"num_memories=4\]"),
    ("model.mixer_args.mom.top_k=0", r"model.mixer_args.mom.top_k=0 must be in"),
    ("model.mixer_args.mom.num_memories=0", r"model.mixer_args.mom.num_memories must be >= 1"),
    ("model.mixer_args.mom.balance_loss_weight=-1",
     r"model.mixer_args.mom.balance_loss_weight must be >= 0"),
    ("model.mixer_args.mom.dispatch=sorted",
     r"model.mixer_args.mom.dispatch: expected one of 'auto', 'packed', 'masked'"),
    ("model.mixer_args.mom.n_heads=3", r"model.mixer_args.mom.n_heads=3 does not divide"),
    ("model.mixer_args.mom.chunk_size=0", r"model.mixer_args.mom.chunk_size must be >= 1"),
    ("model.mixer_args.mom.memories=2", r"unknown config key 'model.mixer_args.mom.memories'"),
])
def test_config_errors(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("configs/mom.yaml", [override])


def test_configs_resolve():
    cfg = load_config("configs/hybrid_mom_swa.yaml")
    args = cfg.model.args_for("mom")
    assert (args.num_memories, args.top_k, args.shared_memory) == (4, 2, True)
    assert args.balance_loss_weight == 0.01
    assert cfg.model.layer_mixers() == ("mom",) * 3 + ("swa",)
    assert load_config("configs/mom.yaml").model.layer_mixers() == ("mom", "mom")


@functools.cache
def _packed_grad(dispatch):
    """Jitted (params, x, ct, seg) -> (d params, y) of sum(y * ct) with packed documents."""
    gd, _ = nnx.split(_mixer(), nnx.Param)

    def loss(p, x, ct, seg):
        y, _ = nnx.merge(gd, p)(x, positions=_pos(x.shape[1]), segment_ids=seg,
                                dispatch=dispatch)
        return jnp.sum(y * ct), y

    return jax.jit(jax.grad(loss, has_aux=True))


@pytest.mark.parametrize("dispatch", ["masked", "packed"])
def test_packed_documents_equal_each_document_alone(dispatch):
    """Row 0: documents of 7 and 9 tokens (the second starts inside chunk 0) and 4 padding;
    row 1: one of 20. Each memory restarts at every document start, whichever memories the
    start's token is routed to, so each document's outputs and parameter gradients are those
    it gets alone."""
    _, params = nnx.split(_mixer(), nnx.Param)
    x = jax.random.normal(jax.random.key(5), (B, T, D))
    ct = jax.random.normal(jax.random.key(6), (B, T, D))
    seg = jnp.asarray([[1] * 7 + [2] * 9 + [0] * 4, [1] * 20], jnp.int32)
    grads, y = _packed_grad(dispatch)(params, x, ct, seg)
    want = jax.tree.map(jnp.zeros_like, grads)
    for r, a, n in ((0, 0, 7), (0, 7, 9), (1, 0, 20)):
        def cut(z, r=r, a=a, n=n):
            return jnp.broadcast_to(z[r:r + 1, a:a + n], (B, n, D))

        # B identical rows (the mixer's batch); half the summed gradient is one document's.
        g, y_doc = _packed_grad(dispatch)(params, cut(x), cut(ct), jnp.ones((B, n), jnp.int32))
        np.testing.assert_allclose(y[r, a:a + n], y_doc[0], rtol=1e-5, atol=1e-6)
        want = jax.tree.map(lambda w, gi: w + gi / B, want, g)
    for got, exp in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(y[0, 16:], 0.0)                 # padding outputs nothing


def test_balance_loss_ignores_padding():
    """The router balance of a packed batch is the one of its real tokens alone: whatever the
    padding holds, and equal to the balance over the real tokens cut out."""
    mom = _mixer()
    x = jax.random.normal(jax.random.key(7), (1, T, D))
    seg = jnp.asarray([[1] * 12 + [0] * 8], jnp.int32)
    junk = x.at[:, 12:].set(100.0 * jax.random.normal(jax.random.key(8), (1, 8, D)))
    a, b = mom.balance_loss(x, seg), mom.balance_loss(junk, seg)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(a, mom.balance_loss(x[:, :12]), rtol=1e-6)
    assert not np.isclose(mom.balance_loss(junk), a)
