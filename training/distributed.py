"""Multi-host start-up: jax.distributed.initialize() when this is one of several processes.

When it initialises (in this order):
  * MNEMAX_DISTRIBUTED=1 (always; 0: never): scripts/tpu_pod.sh sets it on every TPU VM
    worker, where the worker list lives in the VM metadata that jax.distributed reads itself,
  * JAX_NUM_PROCESSES > 1 (with JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID: any cluster, e.g.
    several processes on one machine, as tests/test_multihost.py does), or
  * a Cloud TPU pod slice: TPU_WORKER_HOSTNAMES lists more than one worker (set on every TPU
    VM worker; jax then discovers the coordinator and process ids from the TPU metadata), or
  * SLURM with more than one task (SLURM_NTASKS > 1; jax's SLURM cluster detection).
Otherwise (one process: a laptop, one GPU box, a single-host TPU VM) it does nothing.

After it, jax.devices() lists every process's devices, the mesh spans them all
(models/sharding.py), each process reads its own rows of every batch
(data/pipeline.make_train_iterator(shard=...)), Orbax writes each process's shards of the
checkpoint, and only process 0 writes logs (training/loop.py).
"""

from __future__ import annotations

import os

import jax


def num_processes_from_env(env=None) -> int:
    """How many processes the environment says this job has (1 when it says nothing)."""
    env = os.environ if env is None else env
    if env.get("JAX_NUM_PROCESSES"):
        return int(env["JAX_NUM_PROCESSES"])
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return len(hosts)
    if env.get("SLURM_NTASKS"):
        return int(env["SLURM_NTASKS"])
    return 1


def maybe_initialize(env=None) -> bool:
    """Calls jax.distributed.initialize() for a multi-process job; returns whether it did.

    Must run before anything touches jax's devices (train.py calls it first thing).
    """
    env = os.environ if env is None else env
    forced = env.get("MNEMAX_DISTRIBUTED", "")
    if forced == "0" or (forced != "1" and num_processes_from_env(env) <= 1):
        return False
    kwargs = {}
    if env.get("JAX_NUM_PROCESSES"):
        # jax reads JAX_COORDINATOR_ADDRESS itself, but not the process count and id.
        kwargs = dict(num_processes=int(env["JAX_NUM_PROCESSES"]),
                      process_id=int(env.get("JAX_PROCESS_ID", "0")))
    jax.distributed.initialize(**kwargs)
    return True
