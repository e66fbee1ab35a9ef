"""Evaluate a training run with lm-evaluation-harness tasks.

    python -m evals.lm_eval --run_dir runs/bytes --tasks lambada_openai,hellaswag --limit 200
    python -m evals.lm_eval --run_dir runs/bytes --tasks my_task --include_path my_tasks/ \\
        --no_default_tasks --batch_size 16 --output results.json

Loads the run's newest readable checkpoint (or --step) and its tokenizer (data.tokenizer, or
the copy training saved in RUN_DIR/tokenizer/; byte runs read UTF-8 bytes), wraps them in
evals.lm_eval_adapter.MnemaxLM and runs lm_eval.simple_evaluate. Prints lm-eval's results
table; --output also writes the results as JSON (per-sample records only with --log_samples).
Tasks: lm-eval's built-in ones (indexing them takes ~15 s) and those in --include_path
folders; --no_default_tasks indexes only the latter. Bad input prints one `error:` line and
exits with status 2.

Run it as a module (`python -m evals.lm_eval`): as a script its own folder would come first on
sys.path and this file would shadow the lm_eval package.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from generate import run_main


class UsageError(ValueError):
    """A bad command line, described in one line."""


class _Parser(argparse.ArgumentParser):
    # Raise instead of argparse's own exit, so every user error ends the same way.
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m evals.lm_eval", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--run_dir", required=True, help="a training run directory")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest readable)")
    p.add_argument("--tasks", required=True,
                   help="comma-separated lm-eval task / group / tag names, globs or yaml paths")
    p.add_argument("--include_path", action="append", default=[],
                   help="a folder of extra task yamls (repeatable)")
    p.add_argument("--no_default_tasks", action="store_true",
                   help="index only --include_path tasks, not lm-eval's built-in ones")
    p.add_argument("--limit", type=float,
                   help="documents per task; below 1: that fraction of them")
    p.add_argument("--num_fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--batch_size", type=int, default=8, help="rows per forward (default 8)")
    p.add_argument("--max_len", type=int, help="context length (default and max: model.max_len)")
    p.add_argument("--prefix_token", default="bos_else_eos",
                   help="what empty contexts and rolling documents are conditioned on: "
                        "bos_else_eos (default, lm-eval's HF model rule; newline for byte "
                        "runs), eos, or a token id")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for generate_until tasks")
    p.add_argument("--bootstrap_iters", type=int, default=100000,
                   help="bootstrap resamples for stderrs (0: none; lm-eval's default)")
    p.add_argument("--output", help="write the results as JSON to this file")
    p.add_argument("--log_samples", action="store_true",
                   help="keep per-sample records in the --output JSON")
    return p


def check_args(args) -> None:
    """Checks that need no model and no task index, so a typo fails at once."""
    if not Path(args.run_dir).is_dir():
        raise UsageError(f"run dir '{args.run_dir}' does not exist")
    args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.task_list:
        raise UsageError("--tasks got no task names")
    for folder in args.include_path:
        if not Path(folder).is_dir():
            raise UsageError(f"--include_path '{folder}' is not a directory")
    if args.no_default_tasks and not args.include_path:
        raise UsageError("--no_default_tasks needs an --include_path")
    if args.limit is not None:
        if not args.limit > 0:
            raise UsageError(f"--limit must be > 0, got {args.limit:g}")
        if args.limit >= 1:
            if args.limit != int(args.limit):
                raise UsageError(f"--limit of 1 or more must be a whole number of documents, "
                                 f"got {args.limit:g}")
            args.limit = int(args.limit)
    for name in ("num_fewshot", "bootstrap_iters"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.prefix_token not in ("bos_else_eos", "eos"):
        if not args.prefix_token.isdigit():
            raise UsageError(f"--prefix_token must be bos_else_eos, eos or a token id, got "
                             f"'{args.prefix_token}'")
        args.prefix_token = int(args.prefix_token)
    for name in ("batch_size", "max_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")


def resolve_tasks(names: list[str], task_manager) -> list[str]:
    """The task specs lm-eval will load: known names, matched globs, yaml files. Unknown
    names are a UsageError that lists close names."""
    known = set(task_manager.all_tasks)
    out, unknown = [], []
    for name in names:
        if name in known:
            out.append(name)
        elif any(c in name for c in "*?["):
            matched = task_manager.match_tasks([name])
            if not matched:
                unknown.append(name)
            out.extend(matched)
        elif name.endswith((".yaml", ".yml")) and Path(name).is_file():
            out.append(name)
        else:
            unknown.append(name)
    if unknown:
        parts = []
        for name in unknown:
            close = difflib.get_close_matches(name, task_manager.all_tasks, n=5, cutoff=0.6)
            parts.append(f"'{name}'" + (f" (close: {', '.join(close)})" if close else ""))
        raise UsageError(f"unknown task {'; '.join(parts)}; see `lm_eval ls tasks`, or add a "
                         "folder of task yamls with --include_path")
    return out


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    from evals.lm_eval_adapter import MnemaxLM

    task_manager = TaskManager(include_path=args.include_path or None,
                               include_defaults=not args.no_default_tasks)
    tasks = resolve_tasks(args.task_list, task_manager)
    lm = MnemaxLM.from_run_dir(args.run_dir, args.step, batch_size=args.batch_size,
                               max_length=args.max_len, prefix_token_id=args.prefix_token,
                               seed=args.seed)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager,
                                      limit=args.limit, num_fewshot=args.num_fewshot,
                                      bootstrap_iters=args.bootstrap_iters,
                                      log_samples=args.log_samples)
    info = lm.get_model_info()
    print(f"{args.run_dir} step {info['step']} | max_length {info['max_length']} | "
          f"tokenizer {info['tokenizer']}")
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        if not args.log_samples:
            results.pop("samples", None)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        print(f"wrote {out}")
    return 0


def _is_user_error(e: BaseException) -> bool:
    if isinstance(e, UsageError):
        return True
    from configs.schema import ConfigError
    from data.errors import DataError

    if isinstance(e, (ConfigError, DataError)):
        return True
    # Modules imported only on the way to an evaluation: if they were, their errors are ours.
    for module, name in (("training.checkpoint", "CheckpointError"),
                         ("evals.lm_eval_adapter", "AdapterError"),
                         ("models.generation", "GenerationError")):
        mod = sys.modules.get(module)
        if mod is not None and isinstance(e, getattr(mod, name)):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    return run_main(run, argv, _is_user_error)


if __name__ == "__main__":
    sys.exit(main())
