"""Orbax checkpoints of a run: params, optimizer state, data-iterator state and config.

Layout: RUN_DIR/checkpoints/<step>/{params, opt_state, data, config}. Parameters and optimizer
state are stored as flat {dotted.path: array} dicts, so the files do not depend on how Flax or
optax name their containers, and params restore alone for inference.

Nothing here ever deletes a checkpoint except Orbax's keep-the-newest-K policy while saving.
A checkpoint that cannot be read raises CheckpointError and stays where it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs.schema import Config, ConfigError, config_from_dict, to_plain

logging.getLogger("absl").setLevel(logging.ERROR)


class CheckpointError(RuntimeError):
    """A missing, unreadable or incompatible checkpoint, described in one line."""


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten(tree) -> dict[str, jax.Array]:
    """Pytree -> {"a.b.0.c": leaf}."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def unflatten(flat: dict, template):
    """Inverse of `flatten` for a tree with the structure of `template`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [".".join(_key_name(k) for k in path) for path, _ in paths]
    missing = [n for n in names if n not in flat]
    if missing:
        raise CheckpointError(f"checkpoint lacks entry '{missing[0]}' "
                              f"({len(missing)} of {len(names)} missing)")
    return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def _abstract(flat: dict, shardings=None) -> dict:
    """ShapeDtypeStructs of a flat {name: array} dict; shardings (a tree like the unflattened
    template, or None) sets where each restored array lands."""
    flat_sh = flatten(shardings) if shardings is not None else {}
    return {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=flat_sh.get(k))
            for k, v in flat.items()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


class Checkpointer:
    """Saves and restores one run's checkpoints (RUN_DIR/checkpoints)."""

    def __init__(self, run_dir: str | Path, keep: int = 3):
        self.directory = Path(run_dir).resolve() / "checkpoints"
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"'{self.directory}' exists and is not a directory")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False),
            item_names=("params", "opt_state", "data", "config"))

    def latest_step(self) -> int | None:
        if not self.directory.is_dir():
            return None
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps()) if self.directory.is_dir() else []

    def save(self, step: int, params, opt_state, data_state: dict, cfg: Config) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(flatten(params)),
            opt_state=ocp.args.StandardSave(flatten(opt_state)),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(to_plain(cfg))), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release Orbax's background threads."""
        self.manager.close()

    def _restore(self, step: int, **items):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax raises many types for unreadable files
            raise CheckpointError(
                f"checkpoint step {step} in '{self.directory}' is unreadable "
                f"({_first_line(e)}); it was left in place: move it aside to resume from an "
                "earlier step, or use another run_dir") from None

    def read_config(self, step: int) -> Config:
        raw = self._restore(step, config=ocp.args.JsonRestore()).config
        try:
            return config_from_dict(raw)
        except ConfigError as e:
            raise CheckpointError(f"checkpoint step {step} in '{self.directory}' holds a config "
                                  f"this version cannot load: {e}") from None

    def restore_train_state(self, step: int, params_template, opt_template, shardings=None):
        """-> (params, opt_state, data_state) with the templates' structures; with shardings =
        (params shardings, opt_state shardings) (trees like the templates) every array is read
        straight into its sharding, from whatever mesh saved it."""
        p_sh, o_sh = (None, None) if shardings is None else shardings
        r = self._restore(
            step,
            params=ocp.args.StandardRestore(_abstract(flatten(params_template), p_sh)),
            opt_state=ocp.args.StandardRestore(_abstract(flatten(opt_template), o_sh)),
            data=ocp.args.JsonRestore())
        return unflatten(r.params, params_template), unflatten(r.opt_state, opt_template), r.data

    def restore_params(self, step: int, params_template):
        r = self._restore(step, params=ocp.args.StandardRestore(
            _abstract(flatten(params_template))))
        return unflatten(r.params, params_template)


def check_same_model(saved: Config, current: Config, where: str) -> None:
    """A run dir's checkpoint only resumes into the same architecture."""
    a, b = to_plain(saved.model), to_plain(current.model)
    for key in a:
        if a[key] != b.get(key):
            raise CheckpointError(
                f"{where} holds a checkpoint of a different model (model.{key}: "
                f"{json.dumps(a[key])} there, {json.dumps(b.get(key))} now); "
                "use another run_dir or the saved model settings")


def restore_for_inference(run_dir: str, step: int | None = None):
    """(config, model with restored params, step) from a run dir's checkpoint."""
    from flax import nnx

    from models.lm import build_model

    path = Path(run_dir)
    if not path.is_dir():
        raise CheckpointError(f"run dir '{run_dir}' does not exist")
    ckpt = Checkpointer(path)
    steps = ckpt.all_steps()
    if not steps:
        raise CheckpointError(f"run dir '{run_dir}' has no checkpoint (looked in "
                              f"'{ckpt.directory}')")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise CheckpointError(f"run dir '{run_dir}' has no checkpoint at step {step} "
                              f"(available: {', '.join(map(str, sorted(steps)))})")
    try:
        cfg = ckpt.read_config(step)
        model = build_model(cfg.model, seed=cfg.train.seed)
        graphdef, state = nnx.split(model)
        params = ckpt.restore_params(step, state.to_pure_dict())
    finally:
        ckpt.close()
    return cfg, nnx.merge(graphdef, params), step
