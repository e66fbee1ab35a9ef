"""Autoregressive decoding with a KV cache: sampling, batched prompts, stop tokens, timings.

Shape legend: B batch, V vocabulary, T prompt + new-token slots of the longest row.

`generate(model, prompts, max_new_tokens=...)` runs two compiled programs over
`(graphdef, state, cache, ...)`: a prefill of the shortest prompt length P for every row, and a
decode loop. Rows with longer prompts need no padding mask: the decode loop feeds each row its
own prompt tokens (forced) until the row's prompt runs out, then its sampled tokens. Every row
shares one cache position, which is all the cache supports, and each row still gets
`max_new_tokens` counted from the end of its own prompt.

The decode loop is a `lax.while_loop` inside one jitted call rather than a Python loop over a
jitted step: the stop check runs on the device, so the loop still ends as soon as every row
has stopped, but without a device-to-host sync and a dispatch per token (which dominate decode
time for small models on an accelerator). The price is that tokens are not streamed while
they are produced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.sharding import cache_shardings, param_shardings, use_mesh


class GenerationError(ValueError):
    """A bad request (prompt, token id, sampling setting, cache length), in one line."""


# ----------------------------------------------------------------------------- sampling


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise GenerationError for sampling settings outside their ranges."""
    if not temperature >= 0:  # `not >=` also catches NaN
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def sample_next(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int,
                top_p: float) -> jax.Array:
    """Draw one token per row from logits [B, V] float32 -> [B] int32.

    Temperature 0 is greedy (argmax; top_k and top_p cannot change the argmax). Otherwise the
    logits are divided by the temperature, cut to the top_k largest (0 = off), then to the
    nucleus: the smallest set of the most likely remaining tokens whose probability mass is
    >= top_p (1.0 = off; the top token always stays), and one token is drawn from what is
    left. The temperature is applied before the nucleus is measured, as in HF transformers and
    vLLM, so a low temperature also narrows the nucleus.

    Args:
        logits: [B, V] float32 scores.
        key: a JAX PRNG key.
        temperature: >= 0; a Python float (static under jit).
        top_k: >= 0; a Python int (static).
        top_p: in (0, 1]; a Python float (static).

    Returns:
        [B] int32 token ids.
    """
    check_sampling(temperature, top_k, top_p)
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    vocab = logits.shape[-1]
    use_k = 0 < top_k < vocab
    if not use_k and top_p >= 1.0:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    # Work in rank order: top_k needs only the k best (cheap for a large vocabulary); the
    # nucleus needs a full descending sort when top_k is off.
    ranked, idx = jax.lax.top_k(logits, top_k if use_k else vocab)
    if top_p < 1.0:
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Rank 0 has mass_before 0 < top_p, so the top token always survives.
        ranked = jnp.where(mass_before < top_p, ranked, -jnp.inf)
    choice = jax.random.categorical(key, ranked, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


# ----------------------------------------------------------------------------- cache


def _slot_buffers(node):
    """Every per-position slot buffer inside a layer cache: an object with `pos` [B, S] slot
    positions and a `window` attribute (KVCache, MLACache), at any depth (CCA keeps its
    KVCache inside CCACache; composite mixers nest several)."""
    if hasattr(node, "pos") and hasattr(node, "window"):
        yield node
        return
    if dataclasses.is_dataclass(node):
        children = [getattr(node, f.name) for f in dataclasses.fields(node)]
    elif isinstance(node, (tuple, list)):
        children = list(node)
    elif isinstance(node, dict):
        children = list(node.values())
    else:
        return
    for child in children:
        yield from _slot_buffers(child)


def cache_capacity(cache) -> int | None:
    """How many tokens a ModelCache can take in all, or None when it is unbounded.

    A full-attention slot buffer (window None: KV caches, MLA's latent cache, CCA's latent KV,
    wherever they sit in a layer's cache) holds one slot per position and cannot take more;
    windowed rings and recurrent states have no limit.

    Args:
        cache: a ModelCache, or its `jax.eval_shape` (only shapes are read).

    Returns:
        The smallest full-attention slot count, or None when no layer is bounded.
    """
    caps = [buf.pos.shape[1] for layer in cache.layers for buf in _slot_buffers(layer)
            if buf.window is None]
    return min(caps) if caps else None


# ----------------------------------------------------------------------------- compiled parts


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _prefill(graphdef, state, cache, tokens):
    """tokens [B, P] -> logits of the last position [B, V] and the filled cache."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, cache=cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _decode(state, cache, logits, buf, lengths, ends, stops, key, *, graphdef, temperature,
            top_k, top_p):
    """Fill buf [B, T] from position cache.length on, one token per loop iteration.

    buf holds each row's prompt (zeros after it); lengths [B] prompt lengths; ends [B] the
    position after each row's last new token; stops [S] stop token ids. Returns the filled
    buffer and the cache (returned so its donated buffers are updated in place).
    """
    model = nnx.merge(graphdef, state)
    total = buf.shape[1]

    def choose(buf, done, logits, p):
        # Position p: the row's own prompt token while it lasts, else a sampled one.
        sampled = sample_next(logits, jax.random.fold_in(key, p), temperature=temperature,
                              top_k=top_k, top_p=top_p)
        in_prompt = p < lengths
        tok = jnp.where(in_prompt, jax.lax.dynamic_index_in_dim(buf, p, 1, keepdims=False),
                        sampled)
        stopped = ~in_prompt & jnp.isin(tok, stops)
        buf = jax.lax.dynamic_update_index_in_dim(buf, tok, p, axis=1)
        return buf, done | stopped | (p + 1 >= ends)

    def cond(carry):
        _, _, done, p = carry
        return (p < total) & ~jnp.all(done)

    def body(carry):
        cache, buf, done, p = carry
        fed = jax.lax.dynamic_slice_in_dim(buf, p - 1, 1, axis=1)
        logits, cache = model(fed, cache=cache)
        buf, done = choose(buf, done, logits[:, -1], p)
        return cache, buf, done, p + 1

    p0 = cache.length
    buf, done = choose(buf, jnp.zeros(buf.shape[:1], bool), logits, p0)
    cache, buf, _, _ = jax.lax.while_loop(cond, body, (cache, buf, done, p0 + 1))
    return buf, cache


# ----------------------------------------------------------------------------- generate


@dataclasses.dataclass
class GenerationResult:
    """What `generate` produced and how long it took.

    Attributes:
        tokens: per prompt, the new tokens only, cut after the first sampled stop token (which
            is kept).
        prefill_seconds: the prefill call, compilation excluded.
        decode_seconds: the decode loop (every new token, the first one included),
            compilation excluded.
        new_tokens: new tokens generated over the batch (sum of the lengths in `tokens`).
        tokens_per_second: new_tokens / decode_seconds.
        cache_bytes: memory held by the decode cache.
    """

    tokens: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    new_tokens: int
    tokens_per_second: float
    cache_bytes: int


def _check_ids(ids, vocab_size: int, what: str) -> None:
    for tok in ids:
        if isinstance(tok, bool) or not isinstance(tok, (int, np.integer)):
            raise GenerationError(f"{what}: token ids must be integers, got {tok!r}")
        if not 0 <= tok < vocab_size:
            raise GenerationError(f"{what}: token id {tok} is outside the vocabulary "
                                  f"[0, {vocab_size})")


def _check_fits(capacity: int | None, longest: int, max_new_tokens: int, max_len: int,
                model_max_len: int) -> None:
    if capacity is None:
        return
    need = longest + max_new_tokens
    if need <= capacity:
        return
    hint = (f"raise --max_len, up to model.max_len={model_max_len}, or shorten the prompt"
            if capacity < model_max_len else
            "this is model.max_len; shorten the prompt or lower max_new_tokens")
    raise GenerationError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = "
                          f"{need} exceeds the cache length {capacity} ({hint})")


def _timed(fn, *args):
    """(result, seconds) of one call, waiting for the device before reading the clock."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens=(),
             max_len: int | None = None, cache_dtype=None, mesh=None) -> GenerationResult:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
        model: an LM (models.lm).
        prompts: one non-empty list of token ids per sequence; lengths may differ.
        max_new_tokens: new tokens per sequence, counted from the end of its own prompt.
        temperature: 0 is greedy; see `sample_next` for top_k and top_p.
        seed: the sampling seed (the draw at position p uses fold_in(key(seed), p)).
        stop_tokens: a row stops after sampling any of these (the stop token is kept).
        max_len: cache length; None is model.max_len, more is not allowed.
        cache_dtype: cache dtype; None is the model's compute dtype.
        mesh: a device mesh (models/sharding.make_mesh) to decode on: params sharded by the
            training rules, the cache and the batch split over data x fsdp; None: one device.

    Returns:
        A GenerationResult.

    Raises:
        GenerationError (a ValueError): an empty prompt list or prompt, a token id outside
            the vocabulary, bad sampling settings, or a prompt + max_new_tokens that does not
            fit the cache.
    """
    check_sampling(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not prompts:
        raise GenerationError("no prompts given")
    vocab_size = model.embed.num_embeddings
    prompts = [list(p) for p in prompts]
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise GenerationError(f"prompt {i} is empty (a prompt needs at least one token)")
        _check_ids(prompt, vocab_size, f"prompt {i}")
    stop_tokens = list(stop_tokens)
    _check_ids(stop_tokens, vocab_size, "stop tokens")
    if max_len is None:
        max_len = model.max_len
    if max_len < 1 or max_len > model.max_len:
        raise GenerationError(f"max_len must be in [1, model.max_len={model.max_len}], "
                              f"got {max_len}")

    batch = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    shortest, longest = int(lengths.min()), int(lengths.max())
    # Check the fit on the cache's shapes before allocating it: a cache too small would
    # otherwise be written past its end (dynamic_update_slice clamps the index, silently).
    cache_shape = jax.eval_shape(lambda: model.init_cache(batch, max_len, cache_dtype))
    _check_fits(cache_capacity(cache_shape), longest, max_new_tokens, max_len, model.max_len)
    cache_bytes = cache_shape.nbytes
    if max_new_tokens == 0:
        return GenerationResult([[] for _ in prompts], 0.0, 0.0, 0, 0.0, cache_bytes)

    total = longest + max_new_tokens
    buf = np.zeros((batch, total), np.int32)
    for i, prompt in enumerate(prompts):
        buf[i, :len(prompt)] = prompt
    graphdef, state = nnx.split(model)
    cache = model.init_cache(batch, max_len, cache_dtype)
    if mesh is not None:
        state = jax.device_put(state, param_shardings(state, mesh, model.embed.features))
        cache = jax.device_put(cache, cache_shardings(cache, mesh, batch))
    head = jnp.asarray(buf[:, :shortest])
    buf, ends = jnp.asarray(buf), jnp.asarray(lengths + max_new_tokens)
    stops = jnp.asarray(np.array(stop_tokens, np.int32).reshape(-1))
    key = jax.random.key(seed)
    lengths_dev = jnp.asarray(lengths)

    # Compile ahead of time (cached by JAX across calls with the same shapes) so the clocks
    # below measure execution only.
    with use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        prefill = _prefill.lower(graphdef, state, cache, head).compile()
        (logits, cache), prefill_s = _timed(prefill, state, cache, head)
        decode = _decode.lower(state, cache, logits, buf, lengths_dev, ends, stops, key,
                               graphdef=graphdef, temperature=float(temperature),
                               top_k=int(top_k), top_p=float(top_p)).compile()
    (out, _), decode_s = _timed(decode, state, cache, logits, buf, lengths_dev, ends, stops,
                                key)

    out = np.asarray(out)
    stop_set = set(stop_tokens)
    tokens = []
    for i, n in enumerate(lengths):
        row = out[i, n:n + max_new_tokens].tolist()
        cut = next((j + 1 for j, t in enumerate(row) if t in stop_set), len(row))
        tokens.append(row[:cut])
    new_tokens = sum(len(t) for t in tokens)
    return GenerationResult(tokens=tokens, prefill_seconds=prefill_s, decode_seconds=decode_s,
                            new_tokens=new_tokens,
                            tokens_per_second=new_tokens / decode_s if decode_s > 0 else 0.0,
                            cache_bytes=cache_bytes)
