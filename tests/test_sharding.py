"""Sharding on 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, in a
subprocess so the rest of the suite keeps its one device): the same float32 config gives the
same losses on one device and on meshes (8,1,1), (2,4,1), (2,2,2), and a checkpoint written on
one mesh resumes on another; plus the mesh / rule helpers on one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from models.config_check import load_config
from models.sharding import (
    MeshError,
    make_mesh,
    param_logical_axes,
    resolve_mesh_shape,
    spec_for,
)

WORKER = Path(__file__).with_name("sharding_worker.py")
# float32 losses after a few steps: the meshes differ only in the order of the all-reduce and
# matmul sums (measured <= 2e-7 relative); 1e-5 is tight enough to catch a wrong collective or
# a lost shard (those move the loss by >= 1e-3).
RTOL = 1e-5


@pytest.fixture(scope="module")
def worker_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, text=True,
                          capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_same_losses_on_every_mesh(worker_result):
    assert worker_result["devices"] == 8
    losses = worker_result["losses"]
    one = np.array(losses["1"])
    assert len(one) == 3 and np.all(np.isfinite(one))
    np.testing.assert_allclose(losses["8x1x1"], one, rtol=RTOL, err_msg="8x1x1")
    # Steps 1-2 ran on 2x4x1, step 3 (after a resume) on 2x2x2.
    resumed = worker_result["resumed"]
    np.testing.assert_allclose(resumed["before"], one[:2], rtol=RTOL, err_msg="2x4x1")
    np.testing.assert_allclose(resumed["all"][2:], one[2:], rtol=RTOL, err_msg="2x2x2")


@pytest.mark.slow
def test_checkpoint_resumes_on_another_mesh(worker_result):
    resumed = worker_result["resumed"]
    assert len(resumed["before"]) == 2          # stopped (and saved) after step 2 on 2x4x1
    np.testing.assert_allclose(resumed["all"], worker_result["losses"]["1"], rtol=RTOL)


@pytest.mark.slow
def test_parameters_are_actually_sharded(worker_result):
    specs = worker_result["specs"]
    assert specs["attn_qkv"] == "P('fsdp', 'tensor')"
    assert specs["mlp_down"] == "P('tensor', 'fsdp')"
    assert specs["embedding"] == "P(None, 'fsdp')"


@pytest.mark.slow
def test_decode_on_a_mesh_matches_one_device(worker_result):
    dec = worker_result["decode"]
    assert [len(t) for t in dec["one"]] == [6] * 4
    assert dec["mesh"] == dec["one"]


def test_mesh_shape_resolution_and_errors():
    assert resolve_mesh_shape((-1, 2, 2), 8) == (2, 2, 2)
    assert resolve_mesh_shape((1, -1, 1, 1), 8) == (1, 8, 1, 1)
    with pytest.raises(MeshError, match="needs 4 devices, but 8 are available"):
        resolve_mesh_shape((2, 2, 1, 1), 8)
    with pytest.raises(MeshError, match="do not divide the 8 devices"):
        resolve_mesh_shape((-1, 3, 1, 1), 8)
    cfg = load_config(None, [])
    assert make_mesh(cfg.mesh).shape == {"data": len(jax.devices()), "fsdp": 1, "sequence": 1,
                                         "tensor": 1}


def test_rules_shard_only_what_divides():
    mesh = make_mesh(load_config(None, []).mesh)        # 1 device: every axis has size 1
    assert spec_for(("embed", "heads"), (64, 192), mesh) == jax.sharding.PartitionSpec(
        "fsdp", "tensor")
    assert param_logical_axes(["blocks", "0", "mlp", "down", "kernel"], (192, 64), 64) == (
        "mlp", "embed")
    assert param_logical_axes(["blocks", "0", "mixer", "out", "kernel"], (64, 64), 64) == (
        "heads", "embed")
    assert param_logical_axes(["blocks", "0", "mixer", "q_conv", "kernel"], (4, 64), 64) == (
        None, None)
    assert param_logical_axes(["norm", "scale"], (64,), 64) == ("embed",)


def test_multi_process_detection():
    from training.distributed import num_processes_from_env

    assert num_processes_from_env({}) == 1
    assert num_processes_from_env({"JAX_NUM_PROCESSES": "4"}) == 4
    assert num_processes_from_env({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}) == 4
    assert num_processes_from_env({"TPU_WORKER_HOSTNAMES": "localhost"}) == 1
    assert num_processes_from_env({"SLURM_NTASKS": "2"}) == 2


def test_distributed_switch():
    from training.distributed import maybe_initialize

    # Nothing says "several processes", or the switch says no: jax.distributed is not touched.
    assert maybe_initialize({}) is False
    assert maybe_initialize({"MNEMAX_DISTRIBUTED": "0", "JAX_NUM_PROCESSES": "4"}) is False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(worker_result, tmp_path):
    """A real multi-process job on this machine: 2 processes x 4 CPU devices joined by
    jax.distributed (training/distributed.py), a (2,2,2) mesh across both, each process
    reading its own rows; it stops after step 2 (every host saves its shards), resumes, and
    its losses equal the one-device run's."""
    worker = Path(__file__).with_name("multihost_worker.py")
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                   "--xla_force_host_platform_device_count=4")
        procs.append(subprocess.Popen([sys.executable, str(worker), str(tmp_path / "run")],
                                      env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    np.testing.assert_allclose(losses, worker_result["losses"]["1"], rtol=RTOL)
    assert "resuming from step 2" in outs[0]
