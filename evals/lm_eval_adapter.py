"""An lm-evaluation-harness (lm-eval >= 0.4.9) model over a mnemax LM and its tokenizer.

    from evals.lm_eval_adapter import MnemaxLM
    lm = MnemaxLM.from_run_dir("runs/bytes", batch_size=16)     # or MnemaxLM(model, tokenizer)
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

    # or by name, once this module is imported (it registers the class as "mnemax"):
    lm_eval.simple_evaluate(model="mnemax", model_args="run_dir=runs/bytes,batch_size=16", ...)

Shape legend: B batch rows (always `batch_size`: short batches are padded with dummy rows),
T a bucket length (bounded set, see below), V vocabulary.

Conventions, those of lm-eval's own Hugging Face model (lm_eval/models/huggingface.py, HFLM)
unless said otherwise:
* The prefix token (what an empty context and a rolling document's first token are conditioned
  on), HFLM's prefix_token_id: `prefix_token_id="bos_else_eos"` (the default) takes the
  tokenizer's bos, else its eos; a byte tokenizer has neither and uses "\\n" (10), the
  separator data/text.py puts between documents of a byte corpus (a mnemax choice). "eos" takes
  eos (lm-eval's TemplateLM default), an int takes that id. With none, requests that need one
  are an error.
* Contexts are encoded as HFLM's tok_encode does: with the tokenizer's bos in front when its
  post-processor adds one (`tokenizer.adds_bos`; a tokenizer.json "<s> $A" template) or when
  `add_bos_token=True`; `add_bos_token=False` adds none. A text that already starts with the
  prefix token's text gets none added, and a bos is never doubled. Only a leading bos is
  reproduced: tokens a post-processor appends (an eos after $A) would break lm-eval's pair
  split and are not added.
* loglikelihood(context, continuation): the pair is tokenized by lm-eval's TemplateLM rule
  (trailing spaces of the context move to the continuation; the continuation's ids are those of
  tok_encode(context + continuation) after the first len(tok_encode(context)) ids). An empty
  context is the prefix token, and the continuation is encoded without special tokens. The
  model reads (context + continuation)[-(max_len + 1):][:-1]:
  a pair longer than max_len + 1 tokens loses the left of its context (one warning per call);
  a continuation longer than max_len is an error. Requests are sorted longest first, cut into
  batches of `batch_size`, right-padded to the smallest bucket length that fits (powers of two
  from 16, and max_len) so the jitted full forward (cache=None) compiles a bounded number of
  shapes, and answered in the original order. Log-probs are log_softmax of the float32 logits,
  summed in float64 on the host; is_greedy: the argmax equals the continuation at every position.
* loglikelihood_rolling(text): lm_eval.utils.get_rolling_token_windows(context_len=1) +
  make_disjoint_window: disjoint windows of max_len predictions, the first token predicted from
  the prefix token, the last window given a full max_len of context. All windows of all
  documents are scored as one batch of loglikelihood requests. The document is encoded without
  special tokens: HFLM encodes it with them, so a bos-adding tokenizer scores [bos] + [bos, ...]
  there (lm-evaluation-harness issue 3333); here the prefix token is the only one.
* generate_until(context, gen_kwargs): gen_kwargs go through lm_eval.models.utils.
  normalize_gen_kwargs (until, max_gen_toks and its aliases, do_sample / temperature; top_k and
  top_p are passed on; do_sample=True without a temperature samples at temperature 1). The
  context keeps its last max_len - max_gen_toks tokens. Decoding is models/generation.py's two
  compiled pieces (prefill, then the on-device decode loop, which stops a row at eos) run in
  rounds of `stop_check_every` tokens; after each round the new text of every row is decoded
  and a row that shows an `until` string stops. The answer is cut before the first stop string
  (eos itself is never part of it). Prompts are tok_encode(context), bos included as above.

Sequences shorter than their bucket are padded on the right, which a causal model cannot see,
so results do not depend on the batch a request lands in (up to float32 rounding across
shapes). lm-eval's one-token-continuation logit reuse (group_by="contexts") is not done.
"""

from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

log = logging.getLogger(__name__)

BYTE_PREFIX = 10          # "\n": data/text.py joins the files of a byte corpus with it
MIN_BUCKET = 16
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF model default
PREFIX_RULES = ("bos_else_eos", "eos")


class AdapterError(ValueError):
    """A request or setting this adapter cannot serve, in one line."""


# ----------------------------------------------------------------------------- compiled scoring


@functools.partial(jax.jit, static_argnums=(0,))
def _score(graphdef, state, tokens, targets):
    """tokens, targets [B, T] int32 -> (log p(target) [B, T] float32, argmax == target [B, T]).

    One program per (graphdef, shape); jax.jit's cache keeps them for every adapter over the
    same model, so tests and repeated calls do not compile again.
    """
    model = nnx.merge(graphdef, state)
    logits, _ = model(tokens)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    gold = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return gold, jnp.argmax(logp, axis=-1) == targets


def length_buckets(max_len: int) -> list[int]:
    """Padded lengths the scorer compiles for: 16, 32, ... below max_len, and max_len."""
    out, b = [], MIN_BUCKET
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


def cut_at_stop(text: str, until: list[str]) -> str:
    """text up to the earliest occurrence of any non-empty stop string (lm-eval's
    postprocess_generated_text cuts at each term in turn, which is the same)."""
    cut = min((i for s in until if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pow2_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


@register_model("mnemax")
class MnemaxLM(TemplateLM):
    """lm-eval model over a mnemax LM (models/lm.py) and a data/tokenizer.py tokenizer."""

    def __init__(self, model=None, tokenizer=None, *, run_dir: str | None = None,
                 step: int | None = None, batch_size: int | str | None = 8,
                 max_length: int | None = None, prefix_token_id: int | str | None = None,
                 add_bos_token: bool | None = None, stop_check_every: int = 16, seed: int = 0,
                 **ignored):
        """Either (model, tokenizer) or run_dir (+ step) to load both. max_length defaults to
        model.max_len and may not exceed it. prefix_token_id: "bos_else_eos" (None), "eos" or
        a token id; add_bos_token: None (the tokenizer's rule), True or False; both as HFLM's
        arguments of those names (module docstring). `ignored`: what lm-eval passes to every
        model (max_batch_size, device), unused here."""
        super().__init__()
        if run_dir is not None:
            if model is not None:
                raise AdapterError("give either a model or a run_dir, not both")
            model, tokenizer, self._info = load_run(run_dir, None if step is None else int(step))
        else:
            self._info = {}
        if model is None or tokenizer is None:
            raise AdapterError("MnemaxLM needs a model and a tokenizer (or a run_dir)")
        self.model, self.text_tokenizer = model, tokenizer
        vocab = model.embed.num_embeddings
        if tokenizer.vocab_size > vocab:
            raise AdapterError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's "
                               f"vocabulary is {vocab}")
        self.batch_size = _positive_int(8 if batch_size is None else batch_size, "batch_size")
        self._max_length = model.max_len if max_length is None else _positive_int(
            max_length, "max_length")
        if self._max_length > model.max_len:
            raise AdapterError(f"max_length {self._max_length} exceeds the model's max_len "
                               f"{model.max_len}")
        self.stop_check_every = _positive_int(stop_check_every, "stop_check_every")
        self.seed = int(seed)
        self.buckets = length_buckets(self._max_length)
        self._prefix = resolve_prefix(tokenizer, prefix_token_id, vocab)
        if add_bos_token not in (None, True, False):
            raise AdapterError(f"add_bos_token must be True, False or None, got "
                               f"{add_bos_token!r}")
        if add_bos_token and tokenizer.bos_id is None:
            raise AdapterError(f"add_bos_token=True but tokenizer '{self.tokenizer_name}' has "
                               "no bos")
        self.add_bos_token = add_bos_token
        # Whether tok_encode puts bos in front (HFLM: add_bos_token, else the tokenizer's rule).
        self._bos_first = (bool(getattr(tokenizer, "adds_bos", False)) if add_bos_token is None
                           else add_bos_token)
        for key in ignored:
            if key not in ("max_batch_size", "device"):
                raise AdapterError(f"unknown MnemaxLM argument {key!r}")
        self._graphdef, self._state = nnx.split(model)

    @classmethod
    def from_run_dir(cls, run_dir: str, step: int | None = None, **kwargs) -> MnemaxLM:
        return cls(run_dir=run_dir, step=step, **kwargs)

    # ------------------------------------------------------------------ TemplateLM interface

    @property
    def eot_token_id(self):
        return self.text_tokenizer.eos_id

    @property
    def prefix_token_id(self):
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.text_tokenizer, "source", type(self.text_tokenizer).__name__))

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        """HFLM.tok_encode: add_special_tokens=None means the tokenizer's rule (bos first when
        it adds one, or per add_bos_token), except for a text that starts with the prefix
        token's text; False: plain ids. A bos the text itself starts with is not doubled."""
        ids = list(self.text_tokenizer.encode(string))
        if add_special_tokens is None:
            lead = "" if self._prefix is None else self.tok_decode([self._prefix])
            add_special_tokens = not (lead and string.startswith(lead))
        bos = self.text_tokenizer.bos_id
        if add_special_tokens and self._bos_first and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def tok_decode(self, ids) -> str:
        return self.text_tokenizer.decode(list(ids))

    def get_model_info(self) -> dict:
        """Added by simple_evaluate to results["config"]."""
        return {**self._info, "max_length": self._max_length, "batch_size": self.batch_size,
                "tokenizer": self.tokenizer_name, "prefix_token_id": self._prefix,
                "bos_on_contexts": self._bos_first}

    def _require_prefix(self, what: str) -> int:
        if self._prefix is None:
            raise AdapterError(f"{what} needs a token to condition on, and tokenizer "
                               f"'{self.tokenizer_name}' has no eos or bos: pass "
                               "prefix_token_id")
        return self._prefix

    # ------------------------------------------------------------------ loglikelihood

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """[(context, continuation)] -> [(sum of continuation log-probs, is_greedy)]."""
        encoded = []
        for context, continuation in (r.args for r in requests):
            if context == "":
                # TemplateLM.loglikelihood: condition on the prefix token, unless the
                # continuation itself starts with it.
                prefix = self._require_prefix("a loglikelihood request with an empty context")
                cont = self.tok_encode(continuation, add_special_tokens=False)
                ctx, cont = ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
            else:
                ctx, cont = self._encode_pair(context, continuation)
            encoded.append(((context, continuation), ctx, cont))
        return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = True):
        """[(cache key or None, context ids, continuation ids)] -> [(logprob, is_greedy)]."""
        results: list = [None] * len(requests)
        rows, truncated = [], 0             # (request index, input ids, target ids, n scored)
        limit = self._max_length
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                results[i] = (0.0, True)    # nothing to score
                continue
            if not ctx:
                raise AdapterError("a loglikelihood request needs at least one context token")
            if len(cont) > limit:
                raise AdapterError(f"a continuation of {len(cont)} tokens does not fit "
                                   f"max_length {limit}")
            whole = list(ctx) + list(cont)
            truncated += len(whole) > limit + 1
            whole = whole[-(limit + 1):]
            rows.append((i, whole[:-1], whole[1:], len(cont)))
        if truncated:
            log.warning("%d of %d requests are longer than max_length + 1 = %d tokens: their "
                        "contexts were cut on the left", truncated, len(requests), limit + 1)
        rows.sort(key=lambda r: -len(r[1]))           # longest first, as lm-eval's HF model
        bs = self.batch_size
        for start in tqdm(range(0, len(rows), bs), disable=disable_tqdm,
                          desc="mnemax loglikelihood batches"):
            chunk = rows[start:start + bs]
            width = next(b for b in self.buckets if b >= len(chunk[0][1]))
            tokens = np.zeros((bs, width), np.int32)
            targets = np.zeros((bs, width), np.int32)
            for j, (_, inp, tgt, _) in enumerate(chunk):
                tokens[j, :len(inp)], targets[j, :len(tgt)] = inp, tgt
            gold, greedy = jax.device_get(_score(self._graphdef, self._state, tokens, targets))
            for j, (i, inp, _, k) in enumerate(chunk):
                n = len(inp)
                answer = (float(gold[j, n - k:n].sum(dtype=np.float64)),
                          bool(greedy[j, n - k:n].all()))
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """[(text,)] -> [log p(text)], every token scored once, in windows of max_length."""
        windows, owner = [], []
        texts = [r.args[0] for r in requests]
        for d, text in enumerate(texts):
            ids = self.tok_encode(text, add_special_tokens=False)   # the prefix comes first
            if not ids:
                continue
            prefix = self._require_prefix("loglikelihood_rolling")
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=prefix, max_seq_len=self._max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(d)
        totals = [0.0] * len(texts)
        for d, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[d] += logprob
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """[(context, gen_kwargs)] -> [continuation text, cut before the first stop string]."""
        groups: dict[str, list[int]] = {}   # one decode setting per group, as lm-eval's HF model
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="mnemax generate_until")
        for idxs in groups.values():
            opts = self._gen_options(requests[idxs[0]].args[1])
            prompts = {i: self._gen_prompt(requests[i].args[0], opts["max_gen_toks"])
                       for i in idxs}
            order = sorted(idxs, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                for i, text in zip(chunk, self._generate_batch([prompts[i] for i in chunk],
                                                               **opts)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out

    def _gen_options(self, gen_kwargs: dict) -> dict:
        from lm_eval.models.utils import normalize_gen_kwargs

        kw = dict(normalize_gen_kwargs(dict(gen_kwargs or {}), DEFAULT_MAX_GEN_TOKS))
        until = kw.pop("until") or []
        until = [until] if isinstance(until, str) else list(until)
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
        opts = {"until": until, "max_gen_toks": int(kw.pop("max_gen_toks")),
                "temperature": temperature if do_sample else 0.0,
                "top_k": int(kw.pop("top_k", 0) or 0),
                "top_p": float(kw.pop("top_p", 1.0) or 1.0)}
        if opts["max_gen_toks"] < 1:
            raise AdapterError(f"max_gen_toks must be >= 1, got {opts['max_gen_toks']}")
        if kw:
            log.warning("generate_until ignores gen_kwargs %s", sorted(kw))
        return opts

    def _gen_prompt(self, context: str, max_gen_toks: int) -> list[int]:
        room = self._max_length - max_gen_toks
        if room < 1:
            raise AdapterError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in "
                               f"max_length {self._max_length}")
        ids = self.tok_encode(context)
        if not ids:
            ids = [self._require_prefix("generate_until with an empty context")]
        return ids[-room:]                  # left-truncated, as lm-eval's HF model

    def _generate_batch(self, prompts: list[list[int]], *, until: list[str], max_gen_toks: int,
                        temperature: float, top_k: int, top_p: float) -> list[str]:
        """Continue up to batch_size prompts (sorted longest first); see the module docstring.

        Shapes stay bounded: B = batch_size, the prefill is a power-of-two prefix of the
        shortest prompt (the decode loop feeds every row the rest of its own prompt), and the
        token buffer [B, T] is a power of two (capped at max_length) that holds every row.
        """
        # The compiled prefill and decode loop of models/generation.py (internal pieces: its
        # generate() compiles for each batch's exact lengths and cannot stop at text).
        from models.generation import _decode, _prefill, check_sampling

        check_sampling(temperature, top_k, top_p)
        bs, n = self.batch_size, len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int32)
        head = _pow2_at_most(int(lengths.min()))
        total = min(_pow2_at_least(int(lengths.max()) + max_gen_toks), self._max_length)
        final = lengths + max_gen_toks                     # one past each row's last new token
        buf = np.zeros((bs, total), np.int32)
        for j, p in enumerate(prompts):
            buf[j, :len(p)] = p
        # Dummy rows: the head of the shortest prompt, done at the first step.
        buf[n:, :head] = prompts[-1][:head]
        lengths = np.concatenate([lengths, np.full(bs - n, head, np.int32)])
        final = np.concatenate([final, np.full(bs - n, head + 1, np.int32)])
        finished = np.arange(bs) >= n
        eos = self.text_tokenizer.eos_id
        stops = jnp.asarray(np.array([] if eos is None else [eos], np.int32))
        step = self.stop_check_every if until else total    # no stop strings: one round
        key = jax.random.key(self.seed)
        g, state = self._graphdef, self._state

        cache = self.model.init_cache(bs, self._max_length)
        logits, cache = _prefill(g, state, cache, jnp.asarray(buf[:, :head]))
        pos = head                                          # the next position to fill
        while True:
            ends = np.where(finished, pos + 1, np.minimum(final, pos + step)).astype(np.int32)
            out, cache = _decode(state, cache, logits, jnp.asarray(buf), jnp.asarray(lengths),
                                 jnp.asarray(ends), stops, key, graphdef=g,
                                 temperature=temperature, top_k=top_k, top_p=top_p)
            buf = np.array(out)
            filled = int(cache.length) + 1      # positions < filled hold tokens (the last unfed)
            for j in np.flatnonzero(~finished):
                new = buf[j, lengths[j]:min(filled, final[j])].tolist()
                text = self.tok_decode(new) if until else ""
                finished[j] = (filled >= final[j] or (eos is not None and eos in new)
                               or any(s and s in text for s in until))
            if finished.all() or filled >= total:
                break
            logits, cache = _prefill(g, state, cache, jnp.asarray(buf[:, filled - 1:filled]))
            pos = filled

        texts = []
        for j in range(n):
            new = buf[j, lengths[j]:min(filled, final[j])].tolist()
            if eos is not None and eos in new:
                new = new[:new.index(eos)]
            texts.append(cut_at_stop(self.tok_decode(new), until))
        return texts


def resolve_prefix(tokenizer, rule: int | str | None, vocab: int) -> int | None:
    """The prefix token id for rule "bos_else_eos" (None), "eos" or an id (HFLM's
    prefix_token_id property; the byte fallback is this adapter's). None: the tokenizer has
    neither bos nor eos."""
    if rule is None or rule == "bos_else_eos":
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix is None and getattr(tokenizer, "source", None) == "bytes":
            prefix = BYTE_PREFIX
        return prefix
    if rule == "eos":
        if tokenizer.eos_id is None:
            raise AdapterError(f"prefix_token_id='eos' but tokenizer "
                               f"'{getattr(tokenizer, 'source', '?')}' has no eos")
        return tokenizer.eos_id
    text = str(rule).strip()
    if isinstance(rule, bool) or not text.isdigit():
        raise AdapterError(f"prefix_token_id must be one of {', '.join(PREFIX_RULES)} or a token "
                           f"id, got {rule!r}")
    if not int(text) < vocab:
        raise AdapterError(f"prefix_token_id {text} is outside the vocabulary (size {vocab})")
    return int(text)


def _positive_int(value, name: str) -> int:
    """An int >= 1 from an int or a decimal string (lm-eval's model_args are strings)."""
    text = str(value).strip()
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not text.isdigit() \
            or int(text) < 1:
        raise AdapterError(f"{name} must be a positive integer, got {value!r}")
    return int(text)


def load_run(run_dir: str, step: int | None = None):
    """(model, tokenizer, info) of a run dir's checkpoint; AdapterError without a tokenizer."""
    from data.tokenizer import tokenizer_for_run
    from training.checkpoint import restore_for_inference

    cfg, model, step = restore_for_inference(run_dir, step)
    tokenizer = tokenizer_for_run(cfg, run_dir)
    if tokenizer is None:
        raise AdapterError("this run has no tokenizer (data.tokenizer); lm-eval needs text")
    return model, tokenizer, {"run_dir": str(run_dir), "step": step}
