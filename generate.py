"""Continue prompts with a trained run's model, or with a freshly initialized one.

    python generate.py --run_dir runs/quickstart --prompt_tokens "3 17 5" --max_new_tokens 64
    python generate.py --run_dir runs/bytes --prompt "Once upon a time" --temperature 0.8 \\
        --top_k 40 --top_p 0.9 --stop_token 10
    python generate.py --config configs/quickstart.yaml model.d_model=128 --prompt_tokens "1 2 3"

Text prompts (--prompt) are encoded with the run's tokenizer (data.tokenizer, copied into
RUN_DIR/tokenizer/ by training; data/tokenizer.py), or as UTF-8 bytes for a model without one
(byte models, vocab_size >= 256); token prompts (--prompt_tokens) are space- or comma-separated
ids. Both repeat, and all prompts run as one batch. With a tokenizer that has an end-of-text
token, a sequence stops after sampling it. The continuation is printed as text for models with a
tokenizer and for text prompts, as token ids otherwise, followed by one summary line (prefill
time, decode speed, cache size). Bad input prints one `error:` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import re
import sys


class UsageError(ValueError):
    """A bad command line, described in one line."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and exits itself; raise instead so that every user error ends
    # the same way: one `error:` line, status 2.
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="generate.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run_dir", help="a training run directory: load its checkpoint")
    src.add_argument("--config", help="a YAML config: a freshly initialized model")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                   help="config overrides (with --config only)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--prompt", dest="prompts", action="append", type=lambda s: ("text", s),
                   help="a text prompt, fed as UTF-8 bytes (repeatable)")
    p.add_argument("--prompt_tokens", dest="prompts", action="append",
                   type=lambda s: ("tokens", s),
                   help='a prompt of token ids, e.g. "3 17 5" or "3,17,5" (repeatable)')
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top_k", type=int, default=0, help="0 = off (default)")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0 = off (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--max_len", type=int, default=None,
                   help="decode cache length (default and maximum: model.max_len)")
    p.add_argument("--stop_token", dest="stop_tokens", type=int, action="append", default=[],
                   help="stop a sequence after it samples this id (repeatable)")
    return p


def parse_token_list(text: str) -> list[int]:
    """'3 17 5' or '3,17,5' -> [3, 17, 5]."""
    parts = [s for s in re.split(r"[,\s]+", text.strip()) if s]
    if not parts:
        raise UsageError("--prompt_tokens got an empty list")
    try:
        return [int(s) for s in parts]
    except ValueError:
        bad = next(s for s in parts if not re.fullmatch(r"[+-]?\d+", s))
        raise UsageError(f"--prompt_tokens {text!r}: {bad!r} is not an integer") from None


def check_args(args) -> None:
    """Range checks that need no model, so a typo fails before anything loads."""
    if not args.prompts:
        raise UsageError("give at least one --prompt or --prompt_tokens")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top_k must be >= 0 (0 = off), got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.max_len is not None and args.max_len < 1:
        raise UsageError(f"--max_len must be >= 1, got {args.max_len}")
    if args.run_dir is not None and args.overrides:
        raise UsageError(f"config overrides ({args.overrides[0]}, ...) need --config; a run "
                         "dir's model is fixed by its checkpoint")
    if args.config is not None and args.step is not None:
        raise UsageError("--step needs --run_dir")


def encode_prompts(prompts: list[tuple[str, str]], vocab_size: int,
                   tokenizer=None) -> list[list[int]]:
    """Tagged CLI prompts -> token id lists (text with `tokenizer`, else as UTF-8 bytes)."""
    out = []
    for kind, value in prompts:
        if kind == "tokens":
            out.append(parse_token_list(value))
        elif tokenizer is not None:
            ids = tokenizer.encode(value)
            if not ids:
                raise UsageError(f"--prompt {value!r} encodes to no tokens")
            out.append(ids)
        elif vocab_size < 256:
            raise UsageError(f"this model has no tokenizer (data.tokenizer) and text prompts "
                             f"as UTF-8 bytes need model.vocab_size >= 256, it has "
                             f"{vocab_size}; use --prompt_tokens")
        else:
            out.append(list(value.encode("utf-8")))
    return out


def decode_bytes(ids: list[int]) -> str:
    """Byte ids -> text; invalid UTF-8 and ids >= 256 show as U+FFFD."""
    from data.tokenizer import ByteTokenizer

    return ByteTokenizer().decode(ids)


def human_bytes(n: float) -> str:
    """84600 -> '84.6 kB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def load_model(args):
    """(config, model, step or None) from --run_dir or --config."""
    if args.run_dir is not None:
        # Imported here: only this branch needs checkpoints (and orbax).
        from training.checkpoint import restore_for_inference

        return restore_for_inference(args.run_dir, args.step)
    from models.config_check import load_config
    from models.lm import build_model

    cfg = load_config(args.config, args.overrides)
    return cfg, build_model(cfg.model, seed=cfg.train.seed), None


def run(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    check_args(args)
    cfg, model, step = load_model(args)
    from data.tokenizer import tokenizer_for_run

    tokenizer = tokenizer_for_run(cfg, args.run_dir)
    prompts = encode_prompts(args.prompts, cfg.model.vocab_size, tokenizer)
    stop_tokens = list(args.stop_tokens)
    if tokenizer is not None and tokenizer.eos_id is not None:
        stop_tokens.append(tokenizer.eos_id)

    from models.generation import generate

    result = generate(model, prompts, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      seed=args.seed, stop_tokens=stop_tokens, max_len=args.max_len)
    decode = tokenizer.decode if tokenizer is not None else decode_bytes
    for i, ((kind, given), new) in enumerate(zip(args.prompts, result.tokens, strict=True)):
        if tokenizer is not None or kind == "text":
            shown_prompt = given if kind == "text" else decode(prompts[i])
            print(f"[{i}] prompt: {shown_prompt!r}")
            print(f"[{i}] output: {decode(new)!r}")
        else:
            print(f"[{i}] prompt: {' '.join(map(str, prompts[i]))}")
            print(f"[{i}] output: {' '.join(map(str, new))}")
    source = f"{args.run_dir} step {step}" if step is not None else f"{args.config} (random init)"
    print(f"{source} | prefill {result.prefill_seconds * 1e3:.1f} ms | decode "
          f"{result.new_tokens} tokens in {result.decode_seconds:.3f} s = "
          f"{result.tokens_per_second:.1f} tokens/s | cache {human_bytes(result.cache_bytes)}")
    return 0


def _is_user_error(e: BaseException) -> bool:
    if isinstance(e, UsageError):
        return True
    from configs.schema import ConfigError
    from data.errors import DataError
    from models.generation import GenerationError

    if isinstance(e, (ConfigError, DataError, GenerationError)):
        return True
    # The checkpoint module is imported only for --run_dir; if it was, its errors are ours.
    ckpt = sys.modules.get("training.checkpoint")
    return ckpt is not None and isinstance(e, ckpt.CheckpointError)


def run_main(run, argv: list[str] | None, is_user_error) -> int:
    """The exit status of run(argv) (argv: sys.argv[1:] when None), the ending this command
    line shares with evals/lm_eval.py: an exception is_user_error accepts prints one `error:`
    line and gives 2, Ctrl-C gives 130, anything else propagates (a bug, with its traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run_main(run, argv, _is_user_error)


if __name__ == "__main__":
    sys.exit(main())
