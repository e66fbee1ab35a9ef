"""AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax


def effective_warmup(optim_cfg, total_steps: int) -> int:
    """optim.warmup_steps, or half the run when the warmup would not end before the last step.

    A short smoke run of a real config (`train.steps=30` with warmup 50) should still train:
    warming up over half of it reaches the peak lr and decays after, instead of refusing the
    run. train.py prints a note when this shortens the warmup.
    """
    if optim_cfg.warmup_steps < total_steps:
        return optim_cfg.warmup_steps
    return total_steps // 2


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    warmup = effective_warmup(optim_cfg, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_cfg.lr * optim_cfg.min_lr_ratio)


def _decay_mask(params):
    # Weight decay on matrices (and embeddings) only: decaying norm scales toward 0 fights the
    # normalization they exist for.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(optim_cfg.grad_clip),
        optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                    weight_decay=optim_cfg.weight_decay, mask=_decay_mask),
    )
