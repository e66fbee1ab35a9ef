"""AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
        decay_steps=max(total_steps, optim_cfg.warmup_steps + 1),
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
