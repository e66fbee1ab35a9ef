"""The training loop: jitted AdamW steps, periodic eval, checkpoints, resume, SIGTERM, logs.

Resume is exact: params, optimizer state and the data iterator's state are restored from the
newest checkpoint in RUN_DIR, so the steps after it see the same batches and produce the same
losses as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from configs.schema import Config, save_config
from models.config_check import sequence_layout
from models.lm import build_model, lm_loss_sums
from models.sharding import (
    batch_sharding,
    check_batch,
    check_sequence,
    follow_params,
    lay_out_batch,
    make_mesh,
    param_shardings,
    shard_batch,
    use_mesh,
)
from pallas_kernels.backends import forward_only
from training.checkpoint import Checkpointer, CheckpointError, check_same_model
from training.optim import effective_warmup, learning_rate_schedule, make_optimizer
from training.paths import append_line, is_remote, run_path


def make_train_step(graphdef, optimizer, shardings=None, *, remat: str = "none",
                    grad_accum_steps: int = 1):
    """Jitted (train_step, eval_step). shardings = (params, opt_state, batch) NamedSharding
    trees pins the steps' inputs and outputs to a mesh (models/sharding.py); None lets jit
    place them (one device).

    remat: the blocks' activation checkpointing (models/lm.py: REMAT_POLICIES).
    grad_accum_steps: the batch is cut into this many micro-batches of B / A rows, run one after
    another (lax.scan: one micro-batch's activations live at a time) with their gradients
    summed, then one optimizer update. The LM loss is normalised by the whole batch's token
    count, so loss and gradients equal one pass over the whole batch up to float summation
    order. A layer's auxiliary loss (MoM's router balance) is a per-batch statistic, not a sum
    over tokens; it is averaged over the micro-batches (each one balances its own routing).

    eval_step(params, batch) -> (sum of token cross-entropies, correct argmaxes, scored tokens):
    sums, so an eval set's loss, accuracy and perplexity are exact token means (packed rows
    score different numbers of tokens).
    """
    def forward(params, batch):
        # positions: present when the batch is zigzag-laid-out (models/sharding.lay_out_batch).
        return nnx.merge(graphdef, params)(batch["inputs"], return_aux=True, remat=remat,
                                           segment_ids=batch.get("segment_ids"),
                                           positions=batch.get("positions"))

    def micro_objective(params, micro, n_tokens):
        # The training objective: the LM loss plus the layers' weighted auxiliary losses (MoM's
        # router balance); aux is None (and the objective the LM loss) for other models.
        # segment_ids: present with data.packing (documents kept apart in every layer).
        logits, _, aux = forward(params, micro)
        ce, correct, _ = lm_loss_sums(logits, micro["targets"], micro["loss_mask"])
        loss = ce / n_tokens
        # Whether the model has an aux loss is known while tracing (a Python None or not); it
        # decides which metrics the step returns.
        traced["has_aux"] = aux is not None
        aux = jnp.zeros((), jnp.float32) if aux is None else aux / grad_accum_steps
        return loss + aux, (correct / n_tokens, loss, aux)

    traced = {"has_aux": False}

    def gradients(params, batch):
        # One token count for the whole batch: each micro-batch's summed cross-entropy is
        # divided by it, so the micro-batch losses (and gradients) add up to the batch mean.
        n_tokens = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
        grad_fn = jax.value_and_grad(micro_objective, has_aux=True)
        if grad_accum_steps == 1:
            return grad_fn(params, batch, n_tokens)
        micro = jax.tree.map(partial(_split_micro, grad_accum_steps), batch)

        def add(carry, mb):
            (total, parts), grads = grad_fn(params, mb, n_tokens)
            acc_total, acc_parts, acc_grads = carry
            return (acc_total + total, jax.tree.map(jnp.add, acc_parts, parts),
                    jax.tree.map(jnp.add, acc_grads, grads)), None

        zeros = jnp.zeros((), jnp.float32)
        init = (zeros, (zeros, zeros, zeros), jax.tree.map(jnp.zeros_like, params))
        (total, parts, grads), _ = jax.lax.scan(add, init, micro)
        return (total, parts), grads

    p_sh, o_sh, b_sh = shardings if shardings is not None else (None, None, None)
    train_jit = dict(in_shardings=(p_sh, o_sh, b_sh), out_shardings=(p_sh, o_sh, None)) \
        if shardings is not None else {}
    eval_jit = dict(in_shardings=(p_sh, b_sh)) if shardings is not None else {}

    # Params and optimizer state are donated: the step rewrites them in place.
    @partial(jax.jit, donate_argnums=(0, 1), **train_jit)
    def train_step(params, opt_state, batch):
        (total, (acc, loss, aux)), grads = gradients(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": total, "acc": acc, "grad_norm": optax.global_norm(grads)}
        if traced["has_aux"]:   # "loss" is the objective; its parts are logged beside it
            metrics.update(lm_loss=loss, aux_loss=aux)
        return params, opt_state, metrics

    @partial(jax.jit, **eval_jit)
    def eval_step(params, batch):
        with forward_only():   # never differentiated: "auto" may take its forward-only choice
            logits, _ = nnx.merge(graphdef, params)(batch["inputs"],
                                                    segment_ids=batch.get("segment_ids"),
                                                    positions=batch.get("positions"))
        return lm_loss_sums(logits, batch["targets"], batch["loss_mask"])

    return train_step, eval_step


def _split_micro(n: int, x: jax.Array) -> jax.Array:
    """[B, ...] -> [n, B / n, ...], micro-batch i = rows i, i + n, ...: strided, so that each
    device's contiguous block of a batch-sharded array splits into its own share of every
    micro-batch (no rows move between devices)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)


@contextmanager
def _sigterm_flag():
    """Turns SIGTERM into a flag the loop checks after each step (then saves and exits)."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread: no handler, the loop still works
        previous = None
    try:
        yield flag
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Logger:
    """metrics.jsonl (append), optional wandb, and a progress display."""

    def __init__(self, cfg: Config, run_dir, start_step: int):
        self.path = run_dir / "metrics.jsonl"
        self.total = cfg.train.steps
        self.wandb = None
        self.bar = None
        # Multi-host: every process runs the loop, process 0 alone logs (the run dir may be
        # shared, e.g. a bucket).
        self.primary = jax.process_index() == 0
        if not self.primary:
            return
        if cfg.wandb.mode != "disabled":
            import wandb  # imported only when used: it is slow to import

            # The run id lives in the run dir so a resumed run continues the same wandb run.
            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            # wandb writes its files to a local directory: the run dir, or for a bucket run dir
            # the working directory's ./wandb.
            self.wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name,
                                    mode=cfg.wandb.mode, id=run_id,
                                    dir=None if is_remote(run_dir) else str(run_dir),
                                    resume="allow", config=cfg.to_dict())
        if cfg.train.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.primary:
            return
        append_line(self.path, json.dumps(record))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"},
                           step=record["step"])

    def progress(self, step: int, text: str) -> None:
        if not self.primary:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        else:
            print(f"step {step}/{self.total} {text}", flush=True)

    def message(self, text: str) -> None:
        if not self.primary:
            return
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def evaluate(eval_step, params, batches, batch_bytes=None) -> dict:
    """Token-mean loss, accuracy and perplexity over the eval batches; with batch_bytes (the
    UTF-8 bytes each batch's scored targets stand for) also bits per byte = total nats /
    (ln 2 * total bytes), the tokenizer-independent measure (for a byte model it is
    loss / ln 2)."""
    sums = np.array([[float(v) for v in eval_step(params, b)] for b in batches])
    ce, correct, count = sums.sum(axis=0)
    count = max(count, 1.0)
    out = {"eval_loss": ce / count, "eval_acc": correct / count,
           "eval_ppl": float(np.exp(min(ce / count, 700.0)))}   # exp overflows past ~709
    if batch_bytes is not None:
        out["eval_bpb"] = ce / (np.log(2.0) * max(sum(batch_bytes), 1))
    return out


def train(cfg: Config, *, stop_at_step: int | None = None, devices=None) -> dict:
    """Train (or resume) the run described by cfg. Returns the final metrics.

    stop_at_step: behave as if SIGTERM arrived after that step (used by tests).
    devices: the devices of the mesh (default: every device of every process).
    """
    from data import make_eval_batches, make_train_iterator

    run_dir = run_path(cfg.run_dir)   # local or a bucket (training/paths.py)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"run_dir '{run_dir}' exists and is not a directory")
    # Everything that can fail on bad input happens before the run dir is written to.
    mesh = make_mesh(cfg.mesh, devices)
    check_batch(cfg.data.batch_size, mesh)
    layout = sequence_layout(cfg)
    check_sequence(cfg.data.seq_len, mesh, layout=layout)
    if cfg.train.grad_accum_steps > 1:   # every micro-batch splits over the devices too
        check_batch(cfg.data.batch_size // cfg.train.grad_accum_steps, mesh,
                    what="data.batch_size / train.grad_accum_steps")
    tokenizer = _run_tokenizer(cfg)
    if cfg.data.packing and cfg.data.eos_id is None and tokenizer is not None \
            and tokenizer.eos_id is not None and cfg.data.kind == "tokens":
        # Packed tokens need the document separator: the tokenizer's end-of-text id, which the
        # saved config.yaml then records.
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                eos_id=tokenizer.eos_id))
    # Each process reads its own rows of every batch (data/pipeline.py); eval batches are few
    # and small, so every process builds them whole and keeps its rows.
    shard = (jax.process_index(), jax.process_count())
    train_iter = make_train_iterator(cfg.data, cfg.model.vocab_size, shard=shard)
    eval_batches = [_local_rows(b, shard) for b in
                    make_eval_batches(cfg.data, cfg.model.vocab_size, cfg.train.eval_batches)]
    ckpt = Checkpointer(run_dir, keep=cfg.train.keep_checkpoints, warn=_primary_print)
    try:
        with use_mesh(mesh, layout, cfg.mesh.sequence_attention):
            return _train(cfg, run_dir, ckpt, train_iter, eval_batches, stop_at_step, mesh,
                          tokenizer, layout)
    finally:
        ckpt.close()


def _primary_print(text: str) -> None:
    if jax.process_index() == 0:   # multi-host: one copy of each warning
        print(text, file=sys.stderr, flush=True)


def _local_rows(batch: dict, shard: tuple[int, int]) -> dict:
    index, count = shard
    n = next(iter(batch.values())).shape[0] // count
    return {k: v[index * n:(index + 1) * n] for k, v in batch.items()}


def _run_tokenizer(cfg):
    """The run's tokenizer (data/tokenizer.py), checked against the model's vocabulary; None
    when the run has no text mapping (synthetic tasks, tokens without data.tokenizer)."""
    from data import DataError
    from data.tokenizer import tokenizer_for_run

    tok = tokenizer_for_run(cfg)
    if tok is not None and tok.vocab_size > cfg.model.vocab_size:
        raise DataError(f"data.tokenizer '{cfg.data.tokenizer}' has {tok.vocab_size} ids, more "
                        f"than model.vocab_size={cfg.model.vocab_size}; set model.vocab_size >= "
                        f"{tok.vocab_size} (a multiple of 64 is fastest)")
    return tok


def _eval_bytes(batches, tokenizer) -> list[int] | None:
    """The UTF-8 bytes of each eval batch's scored targets (for bits per byte): each row's
    scored targets decoded as one text, special tokens (eos) counting none."""
    if tokenizer is None:
        return None
    return [sum(tokenizer.text_bytes(row[mask > 0].tolist())
                for row, mask in zip(np.asarray(b["targets"]), np.asarray(b["loss_mask"])))
            for b in batches]


def _train(cfg, run_dir, ckpt, train_iter, eval_batches, stop_at_step, mesh,
           tokenizer, layout) -> dict:
    graphdef, optimizer, params, opt_state, shardings = _initial_state(cfg, mesh)
    start_step, params, opt_state, data_state = _resume_newest(
        cfg, run_dir, ckpt, train_iter, params, opt_state, shardings)
    _write_run_files(cfg, run_dir)
    logger = _Logger(cfg, run_dir, start_step)
    data_summary = _announce_start(cfg, run_dir, logger, params, start_step, data_state, mesh,
                                   layout)
    train_step, eval_step = make_train_step(graphdef, optimizer,
                                            (*shardings, batch_sharding(mesh)),
                                            remat=cfg.train.remat,
                                            grad_accum_steps=cfg.train.grad_accum_steps)
    batch_bytes = _eval_bytes(eval_batches, tokenizer)
    eval_batches = [shard_batch(lay_out_batch(b, mesh, layout), mesh) for b in eval_batches]
    run = _Run(cfg=cfg, mesh=mesh, layout=layout, train_iter=train_iter, train_step=train_step,
               evaluate=lambda params: evaluate(eval_step, params, eval_batches, batch_bytes),
               logger=logger, ckpt=ckpt, data_summary=data_summary)
    with _sigterm_flag() as flag:
        try:
            return _step_loop(run, params, opt_state, start_step,
                              stop_requested=partial(_stop_requested, flag, stop_at_step))
        finally:
            ckpt.wait()
            logger.close()


def _initial_state(cfg, mesh):
    """-> (graphdef, optimizer, params, opt_state, (params shardings, opt_state shardings)):
    a fresh model's parameters and optimizer state, placed sharded on the mesh (FSDP / tensor
    rules in models/sharding.py); the initial values are built on the host and placed once."""
    model = build_model(cfg.model, seed=cfg.train.seed)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    del model, state
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    warmup = effective_warmup(cfg.optim, cfg.train.steps)
    if warmup != cfg.optim.warmup_steps:
        print(f"note: optim.warmup_steps={cfg.optim.warmup_steps} >= train.steps="
              f"{cfg.train.steps}; warming up over {warmup} steps instead", flush=True)
    p_sh = param_shardings(params, mesh, cfg.model.d_model)
    params = jax.device_put(params, p_sh)
    o_sh = follow_params(jax.eval_shape(optimizer.init, params), params, p_sh, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=o_sh)(params)
    return graphdef, optimizer, params, opt_state, (p_sh, o_sh)


def _resume_newest(cfg, run_dir, ckpt, train_iter, params, opt_state, shardings):
    """-> (start step, params, opt_state, data state or None): the newest readable checkpoint
    of the run dir restored (the data iterator moved to its position), or the given state at
    step 0. An unreadable newer checkpoint (a truncated file after a crash) is named in a
    warning and left in place."""
    def resume(step: int):
        check_same_model(ckpt.read_config(step), cfg, f"run dir '{run_dir}'")
        # Restored straight into this run's shardings, whatever mesh wrote the checkpoint.
        return ckpt.restore_train_state(step, params, opt_state, shardings=shardings)

    found = ckpt.restore_newest_readable(resume)
    if found is None:
        return 0, params, opt_state, None
    start_step, (params, opt_state, data_state) = found
    try:
        train_iter.set_state(data_state["iterator"])
    except Exception as e:  # a hand-edited or foreign data state
        raise CheckpointError(f"checkpoint step {start_step} in '{run_dir}' has a "
                              f"data-iterator state this data pipeline cannot restore "
                              f"({type(e).__name__}: {e})") from None
    return start_step, params, opt_state, data_state


def _write_run_files(cfg, run_dir) -> None:
    """The run dir with its config.yaml and its own copy of the tokenizer (process 0)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        save_config(cfg, run_dir / "config.yaml")
        if cfg.data.tokenizer is not None:   # the run keeps its own copy (data/tokenizer.py)
            from data.tokenizer import save_to_run_dir

            save_to_run_dir(cfg.data.tokenizer, run_dir)


def _announce_start(cfg, run_dir, logger, params, start_step, data_state, mesh=None,
                    layout="contiguous") -> str:
    """Logs what the run is (or resumes); warns when the data differ from the checkpoint's.
    -> the data summary the checkpoints record."""
    from data import describe

    data_summary = describe(cfg.data, cfg.model.vocab_size)
    if data_state is not None and data_state.get("source") != data_summary:
        # The iterator state is an index into the data: on other data it resumes elsewhere.
        logger.message(f"warning: the data differ from the checkpoint's "
                       f"({data_state.get('source')!r} then, {data_summary!r} now)")
    n_params = sum(x.size for x in jax.tree.leaves(params))
    shards = mesh.shape.get("sequence", 1) if mesh is not None else 1
    sequence = (f", sequence over {shards} shards ({layout}, attention by "
                f"{cfg.mesh.sequence_attention})" if shards > 1 else "")
    logger.message(f"{'resuming from step ' + str(start_step) if start_step else 'starting'}: "
                   f"{n_params / 1e6:.3f}M params, mixers {list(cfg.model.layer_mixers())}, "
                   f"data {data_summary}{sequence}, run dir {run_dir}")
    return data_summary


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the step loop works with, fixed for the run."""

    cfg: Config
    mesh: Mesh
    layout: str                         # rows over the sequence shards (lay_out_batch)
    train_iter: Any                     # data/pipeline.py: next(), get_state(), set_state()
    train_step: Callable                # (params, opt_state, batch) -> (params, opt_state, m)
    evaluate: Callable[[Any], dict]     # params -> eval metrics (evaluate's dict)
    logger: _Logger
    ckpt: Checkpointer
    data_summary: str


class _Throughput:
    """Training tokens per second since the last report; eval time is left out."""

    def __init__(self, tokens_per_step: int, step: int):
        self.tokens_per_step = tokens_per_step
        self.clock, self.step = time.perf_counter(), step

    def report(self, step: int) -> float:
        now = time.perf_counter()
        tps = self.tokens_per_step * (step - self.step) / max(now - self.clock, 1e-9)
        self.clock, self.step = now, step
        return tps

    def skip_pause(self) -> None:
        """Restart the clock (not the step count) after time spent off training."""
        self.clock = time.perf_counter()


def _stop_requested(flag: dict, stop_at_step: int | None, step: int) -> bool:
    """SIGTERM arrived (on any host), or the test's stop_at_step is reached."""
    stop = flag["stop"] or (stop_at_step is not None and step >= stop_at_step)
    if jax.process_count() > 1:
        # A SIGTERM reaches the hosts at different times: stop together (one small host
        # all-gather per step), or one host would wait forever in a collective.
        stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
    return stop


def _step_loop(run: _Run, params, opt_state, start_step: int, stop_requested) -> dict:
    """Steps from start_step to train.steps (or an earlier stop): logs, evals and checkpoints
    on their schedules; -> the last logged metrics with the final step."""
    t = run.cfg.train
    lr_at = learning_rate_schedule(run.cfg.optim, t.steps)
    meter = _Throughput(run.cfg.data.batch_size * run.cfg.data.seq_len, start_step)
    step, last_metrics = start_step, {}
    while step < t.steps:
        batch = shard_batch(lay_out_batch(next(run.train_iter), run.mesh, run.layout), run.mesh)
        params, opt_state, m = run.train_step(params, opt_state, batch)
        step += 1
        stop = stop_requested(step)
        if step % t.log_every == 0 or step == t.steps or stop:
            last_metrics = _log_train(run.logger, step, m, float(lr_at(step - 1)),
                                      meter.report(step))
        if step % t.eval_every == 0 or step == t.steps:
            ev = run.evaluate(params)
            last_metrics = {**last_metrics, **ev}
            _log_eval(run.logger, step, ev)
            meter.skip_pause()
            if _reached_early_stop(run.logger, step, ev, t.early_stop_acc):
                stop = True
        if step % t.checkpoint_every == 0 or step == t.steps or stop:
            run.ckpt.save(step, params, opt_state,
                          {"iterator": run.train_iter.get_state(), "source": run.data_summary},
                          run.cfg)
        if stop:
            run.logger.message(f"stopping at step {step} (checkpoint saved)")
            break
    return {"step": step, **last_metrics}


def _log_train(logger: _Logger, step: int, m: dict, lr: float, tps: float) -> dict:
    """Writes and shows the step's training metrics; -> the record written."""
    m = {k: float(v) for k, v in m.items()}
    record = {"step": step, **m, "lr": lr, "tokens_per_s": tps}
    logger.write(record)
    logger.progress(step, f"loss {m['loss']:.4f} acc {m['acc']:.3f} {tps:,.0f} tok/s")
    return record


def _log_eval(logger: _Logger, step: int, ev: dict) -> None:
    logger.write({"step": step, **ev})
    bpb = f" bpb {ev['eval_bpb']:.4f}" if "eval_bpb" in ev else ""
    logger.message(f"step {step}: eval loss {ev['eval_loss']:.4f} "
                   f"ppl {ev['eval_ppl']:.2f}{bpb} acc {ev['eval_acc']:.3f}")


def _reached_early_stop(logger: _Logger, step: int, ev: dict, early_stop_acc) -> bool:
    """Whether the eval accuracy reached train.early_stop_acc (said in the log when it did)."""
    if early_stop_acc is None or ev["eval_acc"] < early_stop_acc:
        return False
    logger.message(f"step {step}: eval acc {ev['eval_acc']:.3f} >= "
                   f"train.early_stop_acc={early_stop_acc:g}")
    return True
