"""One process of a 2-process CPU job (tests/test_multihost.py starts two, each with 4 simulated
devices): joins through training.distributed, trains the sharding worker's config on a (2,2,2)
mesh that spans both processes, stopping (with a checkpoint) after step 2 and resuming to the
end, as a multi-host run would.

    JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i JAX_COORDINATOR_ADDRESS=localhost:PORT \\
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multihost_worker.py RUN_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.distributed import maybe_initialize  # noqa: E402

maybe_initialize()

import jax  # noqa: E402

from models.config_check import load_config  # noqa: E402
from tests.sharding_worker import OVERRIDES  # noqa: E402
from training.loop import train  # noqa: E402


def main(run_dir: str) -> None:
    assert jax.process_count() == 2 and len(jax.devices()) == 8, (jax.process_count(),
                                                                   len(jax.devices()))
    cfg = load_config(None, OVERRIDES + [f"run_dir={run_dir}", "mesh.data=2", "mesh.fsdp=2",
                                         "mesh.tensor=2"])
    train(cfg, stop_at_step=2)
    train(cfg)


if __name__ == "__main__":
    main(sys.argv[1])
