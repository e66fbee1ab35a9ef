"""The training loop: jitted AdamW steps, periodic eval, checkpoints, resume, SIGTERM, logs.

Resume is exact: params, optimizer state and the data iterator's state are restored from the
newest checkpoint in RUN_DIR, so the steps after it see the same batches and produce the same
losses as an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import uuid
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from configs.schema import Config, save_config
from models.lm import build_model, lm_loss
from models.sharding import (
    batch_sharding,
    check_batch,
    follow_params,
    make_mesh,
    param_shardings,
    shard_batch,
    use_mesh,
)
from training.checkpoint import Checkpointer, CheckpointError, check_same_model
from training.optim import effective_warmup, learning_rate_schedule, make_optimizer


def make_train_step(graphdef, optimizer, shardings=None):
    """Jitted (train_step, eval_step). shardings = (params, opt_state, batch) NamedSharding
    trees pins the steps' inputs and outputs to a mesh (models/sharding.py); None lets jit
    place them (one device)."""
    def loss_fn(params, batch):
        logits, _ = nnx.merge(graphdef, params)(batch["inputs"],
                                                segment_ids=batch.get("segment_ids"))
        return lm_loss(logits, batch["targets"], batch["loss_mask"])

    def objective(params, batch):
        # The training objective: the LM loss plus the layers' weighted auxiliary losses (MoM's
        # router balance); aux is None (and the objective the LM loss) for other models.
        # segment_ids: present with data.packing (documents kept apart in every layer).
        logits, _, aux = nnx.merge(graphdef, params)(batch["inputs"], return_aux=True,
                                                     segment_ids=batch.get("segment_ids"))
        loss, acc = lm_loss(logits, batch["targets"], batch["loss_mask"])
        return (loss if aux is None else loss + aux), (acc, loss, aux)

    p_sh, o_sh, b_sh = shardings if shardings is not None else (None, None, None)
    train_jit = dict(in_shardings=(p_sh, o_sh, b_sh), out_shardings=(p_sh, o_sh, None)) \
        if shardings is not None else {}
    eval_jit = dict(in_shardings=(p_sh, b_sh)) if shardings is not None else {}

    # Params and optimizer state are donated: the step rewrites them in place.
    @partial(jax.jit, donate_argnums=(0, 1), **train_jit)
    def train_step(params, opt_state, batch):
        (total, (acc, loss, aux)), grads = jax.value_and_grad(objective, has_aux=True)(
            params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": total, "acc": acc, "grad_norm": optax.global_norm(grads)}
        if aux is not None:   # "loss" is the objective; its parts are logged beside it
            metrics.update(lm_loss=loss, aux_loss=aux)
        return params, opt_state, metrics

    @partial(jax.jit, **eval_jit)
    def eval_step(params, batch):
        return loss_fn(params, batch)

    return train_step, eval_step


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

    def __init__(self, cfg: Config, run_dir: Path, start_step: int):
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
            self.wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name,
                                    mode=cfg.wandb.mode, dir=str(run_dir), id=run_id,
                                    resume="allow", config=cfg.to_dict())
        if cfg.train.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.primary:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
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


def evaluate(eval_step, params, batches) -> dict:
    losses, accs = zip(*(eval_step(params, b) for b in batches))
    return {"eval_loss": float(jnp.mean(jnp.stack(losses))),
            "eval_acc": float(jnp.mean(jnp.stack(accs)))}


def train(cfg: Config, *, stop_at_step: int | None = None, devices=None) -> dict:
    """Train (or resume) the run described by cfg. Returns the final metrics.

    stop_at_step: behave as if SIGTERM arrived after that step (used by tests).
    devices: the devices of the mesh (default: every device of every process).
    """
    from data import make_eval_batches, make_train_iterator

    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"run_dir '{run_dir}' exists and is not a directory")
    # Everything that can fail on bad input happens before the run dir is written to.
    mesh = make_mesh(cfg.mesh, devices)
    check_batch(cfg.data.batch_size, mesh)
    # Each process reads its own rows of every batch (data/pipeline.py); eval batches are few
    # and small, so every process builds them whole and keeps its rows.
    shard = (jax.process_index(), jax.process_count())
    train_iter = make_train_iterator(cfg.data, cfg.model.vocab_size, shard=shard)
    eval_batches = [_local_rows(b, shard) for b in
                    make_eval_batches(cfg.data, cfg.model.vocab_size, cfg.train.eval_batches)]
    ckpt = Checkpointer(run_dir, keep=cfg.train.keep_checkpoints, warn=_primary_print)
    try:
        with use_mesh(mesh):
            return _train(cfg, run_dir, ckpt, train_iter, eval_batches, stop_at_step, mesh)
    finally:
        ckpt.close()


def _primary_print(text: str) -> None:
    if jax.process_index() == 0:   # multi-host: one copy of each warning
        print(text, file=sys.stderr, flush=True)


def _local_rows(batch: dict, shard: tuple[int, int]) -> dict:
    index, count = shard
    n = next(iter(batch.values())).shape[0] // count
    return {k: v[index * n:(index + 1) * n] for k, v in batch.items()}


def _train(cfg, run_dir, ckpt, train_iter, eval_batches, stop_at_step, mesh) -> dict:
    from data import describe

    model = build_model(cfg.model, seed=cfg.train.seed)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    del model, state
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    warmup = effective_warmup(cfg.optim, cfg.train.steps)
    if warmup != cfg.optim.warmup_steps:
        print(f"note: optim.warmup_steps={cfg.optim.warmup_steps} >= train.steps="
              f"{cfg.train.steps}; warming up over {warmup} steps instead", flush=True)
    # Params and optimizer state live sharded on the mesh from here on (FSDP / tensor rules in
    # models/sharding.py); the initial values are built on the host and placed once.
    p_sh = param_shardings(params, mesh, cfg.model.d_model)
    params = jax.device_put(params, p_sh)
    o_sh = follow_params(jax.eval_shape(optimizer.init, params), params, p_sh, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=o_sh)(params)

    def resume(step: int):
        check_same_model(ckpt.read_config(step), cfg, f"run dir '{run_dir}'")
        # Restored straight into this run's shardings, whatever mesh wrote the checkpoint.
        return ckpt.restore_train_state(step, params, opt_state, shardings=(p_sh, o_sh))

    # The newest checkpoint that can be read; an unreadable newer one (a truncated file after a
    # crash) is named in a warning and left in place.
    found = ckpt.restore_newest_readable(resume)
    start_step, data_state = 0, None
    if found is not None:
        start_step, (params, opt_state, data_state) = found
        try:
            train_iter.set_state(data_state["iterator"])
        except Exception as e:  # a hand-edited or foreign data state
            raise CheckpointError(f"checkpoint step {start_step} in '{run_dir}' has a "
                                  f"data-iterator state this data pipeline cannot restore "
                                  f"({type(e).__name__}: {e})") from None

    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        save_config(cfg, run_dir / "config.yaml")
    logger = _Logger(cfg, run_dir, start_step)
    data_summary = describe(cfg.data, cfg.model.vocab_size)
    if data_state is not None and data_state.get("source") != data_summary:
        # The iterator state is an index into the data: on other data it resumes elsewhere.
        logger.message(f"warning: the data differ from the checkpoint's "
                       f"({data_state.get('source')!r} then, {data_summary!r} now)")
    n_params = sum(x.size for x in jax.tree.leaves(params))
    logger.message(f"{'resuming from step ' + str(start_step) if start_step else 'starting'}: "
                   f"{n_params / 1e6:.3f}M params, mixers {list(cfg.model.layer_mixers())}, "
                   f"data {data_summary}, run dir {run_dir}")

    train_step, eval_step = make_train_step(graphdef, optimizer,
                                            (p_sh, o_sh, batch_sharding(mesh)))
    eval_batches = [shard_batch(b, mesh) for b in eval_batches]
    lr_at = learning_rate_schedule(cfg.optim, cfg.train.steps)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    t, last_metrics = cfg.train, {}
    step = start_step
    clock, clock_step = time.perf_counter(), start_step
    with _sigterm_flag() as flag:
        try:
            while step < t.steps:
                batch = shard_batch(next(train_iter), mesh)
                params, opt_state, m = train_step(params, opt_state, batch)
                step += 1
                stop = flag["stop"] or (stop_at_step is not None and step >= stop_at_step)
                if jax.process_count() > 1:
                    # A SIGTERM reaches the hosts at different times: stop together (one small
                    # host all-gather per step), or one host would wait forever in a collective.
                    stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
                if step % t.log_every == 0 or step == t.steps or stop:
                    m = {k: float(v) for k, v in m.items()}
                    now = time.perf_counter()
                    tps = tokens_per_step * (step - clock_step) / max(now - clock, 1e-9)
                    clock, clock_step = now, step
                    last_metrics = {"step": step, **m, "lr": float(lr_at(step - 1)),
                                    "tokens_per_s": tps}
                    logger.write(last_metrics)
                    logger.progress(step, f"loss {m['loss']:.4f} acc {m['acc']:.3f} "
                                          f"{tps:,.0f} tok/s")
                if step % t.eval_every == 0 or step == t.steps:
                    ev = evaluate(eval_step, params, eval_batches)
                    last_metrics = {**last_metrics, **ev}
                    logger.write({"step": step, **ev})
                    logger.message(f"step {step}: eval loss {ev['eval_loss']:.4f} "
                                   f"acc {ev['eval_acc']:.3f}")
                    clock = time.perf_counter()  # eval time is not training throughput
                if step % t.checkpoint_every == 0 or step == t.steps or stop:
                    ckpt.save(step, params, opt_state,
                              {"iterator": train_iter.get_state(), "source": data_summary}, cfg)
                if stop:
                    logger.message(f"stopping at step {step} (checkpoint saved)")
                    break
        finally:
            ckpt.wait()
            logger.close()
    return {"step": step, **last_metrics}
