"""Orbax checkpoints of a run: params, optimizer state, data-iterator state and config.

Layout: RUN_DIR/checkpoints/<step>/{params, opt_state, data, config, checksums}. Parameters and
optimizer state are stored as flat {dotted.path: array} dicts, so the files do not depend on
how Flax or optax name their containers, and params restore alone for inference.

Every array is saved with a checksum of its bits (`checksums`), verified on restore: Orbax and
TensorStore notice a truncated file, but a damaged byte inside a compressed chunk can decode to
other numbers (seen here: a 64-byte hole read back as NaN weights, without an error).

A checkpoint that cannot be read (a truncated, damaged or missing file, a checksum that does not
match) is skipped with a one-line warning when an older one can be read, and stays where it
is; only when none can be read is it an error. Nothing here deletes a checkpoint except the
keep-the-newest-K policy, which counts readable checkpoints only, so a skipped one never pushes
out the checkpoint a run resumed from. When a resumed run reaches the step of a skipped one
again, that one is moved to RUN_DIR/unreadable_checkpoints/ before the new save (never
overwritten).
"""

from __future__ import annotations

import gc
import json
import logging
import re
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from configs.schema import Config, ConfigError, to_plain
from models.config_check import config_from_dict
from training.paths import run_path

logging.getLogger("absl").setLevel(logging.ERROR)

ITEMS = ("params", "opt_state", "data", "config", "checksums")


class CheckpointError(RuntimeError):
    """A missing, unreadable or incompatible checkpoint, described in one line."""


class UnreadableCheckpoint(CheckpointError):
    """One checkpoint's files cannot be read back as they were written (an older one may)."""

    def __init__(self, step: int, directory: Path, problem: str):
        super().__init__(f"checkpoint step {step} in '{directory}' is unreadable: {problem}")
        self.step, self.problem = step, problem


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


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@jax.jit
def _bit_checksums(flat: dict) -> dict:
    """{name: uint32[2]}: Fletcher-style sums of each array's bits, (sum w_i, sum (i+1) w_i)
    mod 2**32 over its elements' bit patterns w_i. Integer sums wrap the same way in any order,
    so the value does not depend on the sharding or the reduction XLA picks; the weighted sum
    also catches elements that moved. Runs where the arrays live (no host copy of the model)."""
    out = {}
    for name, x in flat.items():
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        w = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
        i = jax.lax.broadcasted_iota(jnp.uint32, (max(x.size, 1),), 0)[:x.size].reshape(x.shape)
        out[name] = jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                               jnp.sum(w * (i + 1), dtype=jnp.uint32)])
    return out


def checksums(part: str, flat: dict) -> dict[str, list[int]]:
    """{"part/name": [s1, s2]} of a flat dict of arrays (see _bit_checksums)."""
    if not flat:
        return {}
    sums = jax.device_get(_bit_checksums(flat))
    return {f"{part}/{k}": [int(v[0]), int(v[1])] for k, v in sums.items()}


# Orbax and TensorStore report a bad file as a chain of exceptions whose outer text is a
# Python repr of a TensorStore spec; the cause at the bottom says what is wrong. These turn the
# common causes into words: (pattern in that text, what it means).
_PROBLEMS = (
    (r"Requested byte range .* is not valid|OUT_OF_RANGE", "is truncated (its file is shorter "
     "than the checkpoint's index says)"),
    (r"DATA_LOSS|[Dd]ecod|[Cc]orrupt|checksum", "is damaged (its bytes do not decode)"),
    (r"NOT_FOUND|No such file|does not exist", "is missing a file"),
)


def _explain(e: BaseException) -> str:
    """A plain-words account of why Orbax could not read a checkpoint."""
    chain, x = [], e
    while x is not None and len(chain) < 10:
        chain.append(x)
        x = x.__cause__ or x.__context__
    text = " | ".join(str(c) for c in chain)
    m = re.search(r'Item "(\w+)" was not found', text)
    if m:
        return f"its '{m.group(1)}' part is missing"
    if any(isinstance(c, json.JSONDecodeError) for c in chain):
        return "one of its JSON files (config or data state) is not valid JSON"
    m = re.search(r'reading "([^"/]+)/[^"]*" in OCDBT database at local file "([^"]+)"', text) \
        or re.search(r'reading "([^"/]+)/[^"]*" in OCDBT database at .*?"([^"]+)"', text)
    where = (f"array '{m.group(1)}' of {Path(m.group(2).rstrip('/')).name}" if m
             else "an array file")
    for pattern, meaning in _PROBLEMS:
        if re.search(pattern, text):
            return f"{where} {meaning}"
    # Unknown: the deepest message, first line, without TensorStore's repr of itself.
    deepest = str(chain[-1]).strip().splitlines()
    detail = re.sub(r"<bound method [^>]*>?|See full TensorStore details:.*", "",
                    deepest[0] if deepest else "").strip()
    return f"{type(chain[-1]).__name__}: {detail[:200]}" if detail else type(chain[-1]).__name__


def _is_orbax_echo(unraisable) -> bool:
    """An unraisable exception left behind by a failed Orbax read: raised in Orbax's code, in
    one of its coroutines, or a TensorStore callback thread scheduling onto the event loop
    Orbax has already closed ("Event loop is closed" from asyncio)."""
    frames, tb = [], unraisable.exc_traceback
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:
        frames.append(code.co_filename)
    if any("orbax" in f for f in frames):
        return True
    closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                   and "Event loop is closed" in str(unraisable.exc_value))
    return closed_loop and any("asyncio" in f for f in frames)


# TensorStore's status codes as they open its error messages ("OUT_OF_RANGE: ..."), alone and
# inside the repr asyncio logs of a future ("exception=ValueError('OUT_OF_RANGE: ...')").
_STATUS = "OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT|UNKNOWN|INTERNAL"
_TENSORSTORE_STATUS = re.compile(rf"^({_STATUS}): ")
_TENSORSTORE_IN_REPR = re.compile(rf"exception=\w+\('({_STATUS}): ")


class _AsyncioEchoFilter(logging.Filter):
    """Drops asyncio's "Future/Task exception was never retrieved" records for a failed
    TensorStore read: the other reads of a checkpoint whose one array failed end the same way,
    and asyncio logs each when the future is collected (the one-line warning already said
    which checkpoint is unreadable and why)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "exception was never retrieved" not in text:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        echoed = ("orbax" in text or "tensorstore" in text.lower()
                  or (exc is not None and _TENSORSTORE_STATUS.match(str(exc)) is not None)
                  or _TENSORSTORE_IN_REPR.search(text) is not None)
        return not echoed


def _install_echo_filter() -> None:
    """Wraps sys.unraisablehook and filters the asyncio logger (once per process) so Orbax's
    echoes are dropped and every other unraisable exception or asyncio record still gets
    through. It stays installed: the echoes can surface from background threads long after
    the failed read returned."""
    if getattr(sys.unraisablehook, "_mnemax_echo_filter", False):
        return
    logging.getLogger("asyncio").addFilter(_AsyncioEchoFilter())
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_orbax_echo(unraisable):
            previous(unraisable)

    hook._mnemax_echo_filter = True
    sys.unraisablehook = hook


@contextmanager
def _quiet_orbax_leftovers():
    """When one array of a checkpoint fails to read, Orbax leaves the reads of the others as
    coroutines that fail again when garbage-collected, and Python prints each one's traceback
    (with TensorStore's repr of itself) to stderr. Those are echoes of the error already
    reported in one line: drop them (_install_echo_filter) and collect them here."""
    _install_echo_filter()
    try:
        yield
    finally:
        gc.collect()


class Checkpointer:
    """Saves and restores one run's checkpoints (RUN_DIR/checkpoints).

    warn: where one-line warnings go (default: stderr).
    """

    def __init__(self, run_dir: str | Path, keep: int = 3,
                 warn: Callable[[str], None] | None = None):
        self.run_dir = run_path(run_dir)   # local or a bucket (training/paths.py)
        self.directory = self.run_dir / "checkpoints"
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"'{self.directory}' exists and is not a directory")
        self.keep = keep
        self.warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
        self.unreadable: set[int] = set()   # steps found unreadable: not counted as kept
        # Retention is ours (_prune), not Orbax's max_to_keep: Orbax would count an unreadable
        # checkpoint among the newest K and delete a readable one in its place.
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=False),
            item_names=ITEMS)

    def latest_step(self) -> int | None:
        if not self.directory.is_dir():
            return None
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps()) if self.directory.is_dir() else []

    def save(self, step: int, params, opt_state, data_state: dict, cfg: Config) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manager.wait_until_finished()   # the previous save is committed: safe to prune
        self._prune()
        if step in self.manager.all_steps():
            self._move_aside(step)
        flat_p, flat_o = flatten(params), flatten(opt_state)
        sums = {**checksums("params", flat_p), **checksums("opt_state", flat_o)}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(flat_p),
            opt_state=ocp.args.StandardSave(flat_o),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(to_plain(cfg)),
            checksums=ocp.args.JsonSave(sums)), force=True)

    def _prune(self) -> None:
        """Deletes the oldest readable checkpoints beyond `keep` (unreadable ones stay)."""
        readable = [s for s in self.all_steps() if s not in self.unreadable]
        for step in readable[:max(len(readable) - self.keep, 0)]:
            self.manager.delete(step)

    def _move_aside(self, step: int) -> None:
        """A skipped (unreadable) checkpoint holds the step about to be saved: keep its files
        under RUN_DIR/unreadable_checkpoints/ rather than refuse the save or overwrite them."""
        if jax.process_index() == 0:
            dest = self.run_dir / "unreadable_checkpoints" / str(step)
            n = 1
            while dest.exists():
                dest, n = self.run_dir / "unreadable_checkpoints" / f"{step}-{n}", n + 1
            dest.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(dest)
            self.warn(f"warning: moved the unreadable checkpoint step {step} to '{dest}' "
                      f"before saving step {step} again")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"mnemax_move_aside_{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()
        if self.directory.is_dir():
            self._prune()

    def close(self) -> None:
        """Finish pending saves and release Orbax's background threads."""
        self.manager.close()

    def _restore(self, step: int, **items):
        problem = None
        with _quiet_orbax_leftovers():
            try:
                return self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # Orbax raises many types for unreadable files
                problem = _explain(e)
        raise UnreadableCheckpoint(step, self.directory, problem)

    def _verify(self, step: int, part: str, flat: dict) -> None:
        """Compares restored arrays with the checksums saved beside them (checkpoints written
        before checksums existed have none: nothing to compare)."""
        if not (self.directory / str(step) / "checksums").is_dir():
            return
        saved = self._restore(step, checksums=ocp.args.JsonRestore()).checksums
        for name, sums in checksums(part, flat).items():
            if name in saved and list(saved[name]) != sums:
                raise UnreadableCheckpoint(
                    step, self.directory, f"array '{name.split('/', 1)[1]}' of {part} does not "
                    "match the checksum saved with it (its file changed after it was written)")

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
        self._verify(step, "params", r.params)
        self._verify(step, "opt_state", r.opt_state)
        return unflatten(r.params, params_template), unflatten(r.opt_state, opt_template), r.data

    def restore_params(self, step: int, params_template):
        r = self._restore(step, params=ocp.args.StandardRestore(
            _abstract(flatten(params_template))))
        self._verify(step, "params", r.params)
        return unflatten(r.params, params_template)

    def restore_newest_readable(self, restore: Callable[[int], object]):
        """(step, restore(step)) for the newest step whose restore raises no
        UnreadableCheckpoint, or None when the run dir has no checkpoint. Each unreadable step
        on the way is left in place and named in a one-line warning; when none can be read it
        is an error naming every step's problem. Other errors (another model's checkpoint)
        stop at once: an older step would not fix them."""
        problems = []
        for step in reversed(self.all_steps()):
            try:
                result = restore(step)
            except UnreadableCheckpoint as e:
                self.unreadable.add(step)
                problems.append(e)
                continue
            for bad in problems:
                self.warn(f"warning: {bad}; left it in place, using step {step} instead")
            return step, result
        if not problems:
            return None
        listed = "; ".join(f"step {e.step}: {e.problem}" for e in problems)
        raise CheckpointError(
            f"no checkpoint in '{self.directory}' can be read ({listed}); they were left in "
            "place: move them aside to start afresh, or use another run_dir")


def check_same_model(saved: Config, current: Config, where: str) -> None:
    """A run dir's checkpoint only resumes into the same architecture."""
    a, b = to_plain(saved.model), to_plain(current.model)
    for key in a:
        if a[key] != b.get(key):
            raise CheckpointError(
                f"{where} holds a checkpoint of a different model (model.{key}: "
                f"{json.dumps(a[key])} there, {json.dumps(b.get(key))} now); "
                "use another run_dir or the saved model settings")


def restore_for_inference(run_dir: str, step: int | None = None, warn=None):
    """(config, model with restored params, step) from a run dir's checkpoint: `step`, or the
    newest one that can be read (an unreadable newer one is named in a warning, via `warn`)."""
    from flax import nnx

    from models.lm import build_model

    path = run_path(run_dir)
    if not path.is_dir():
        raise CheckpointError(f"run dir '{run_dir}' does not exist")
    ckpt = Checkpointer(path, warn=warn)
    steps = ckpt.all_steps()
    if not steps:
        raise CheckpointError(f"run dir '{run_dir}' has no checkpoint (looked in "
                              f"'{ckpt.directory}')")
    if step is not None and step not in steps:
        raise CheckpointError(f"run dir '{run_dir}' has no checkpoint at step {step} "
                              f"(available: {', '.join(map(str, sorted(steps)))})")

    def load(s: int):
        cfg = ckpt.read_config(s)
        graphdef, state = nnx.split(build_model(cfg.model, seed=cfg.train.seed))
        return cfg, nnx.merge(graphdef, ckpt.restore_params(s, state.to_pure_dict()))

    try:
        if step is None:
            step, (cfg, model) = ckpt.restore_newest_readable(load)
        else:
            try:
                cfg, model = load(step)
            except UnreadableCheckpoint as e:
                raise CheckpointError(f"{e}; it was left in place") from None
    finally:
        ckpt.close()
    return cfg, model, step
