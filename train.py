"""Train a model from a YAML config.

    python train.py configs/quickstart.yaml
    python train.py configs/X.yaml model.d_model=128 train.steps=200 run_dir=runs/a

Resumes from the newest checkpoint in run_dir when there is one. On several devices the
`mesh` section shards the run (models/sharding.py); started on every host of a multi-host job
(a TPU pod: scripts/tpu_pod.sh), the processes join through jax.distributed first.
Bad input (unknown key, wrong type, impossible shape, missing data, unreadable checkpoint,
a mesh that does not fit the devices) prints one `error:` line and exits with status 2 before
anything is compiled or written.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    config_path, overrides = argv[0], argv[1:]
    if "=" in config_path:
        print(f"error: the first argument must be a config file, got '{config_path}'",
              file=sys.stderr)
        return 2

    from configs.schema import ConfigError
    from data import DataError
    from models.config_check import load_config
    from models.sharding import MeshError
    from training.checkpoint import CheckpointError
    from training.distributed import maybe_initialize
    from training.loop import train

    try:
        cfg = load_config(config_path, overrides)
        # Several processes (a TPU pod, a multi-node GPU job): join them before any device use.
        maybe_initialize()
        train(cfg)
    except (ConfigError, CheckpointError, DataError, MeshError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
