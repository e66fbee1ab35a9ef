"""Context parallelism (pallas_kernels/context_parallel, mesh.sequence) on 8 simulated CPU
devices, in a subprocess (tests/context_parallel_worker.py) so the rest of the suite keeps its
one device: for every registered mixer, float32 logits and every parameter gradient on packed
rows (documents crossing shard boundaries, one starting exactly on a boundary, trailing padding
across one) equal the one-device run's; the mixers with an exchange of their own gather no
activation's whole time axis (attention: only its keys and values); train.py's loop with
mesh.sequence = 4 logs the one-device run's losses and gradient norms. Both layouts:
contiguous and zigzag (the batch reordered on the host). Plus the layout, mesh and config
checks on one device."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import ConfigError
from layers.registry import MIXERS
from models import config_check
from models.config_check import load_config, sequence_layout
from models.sharding import (
    MeshError,
    check_sequence,
    lay_out_batch,
    make_mesh,
    resolve_mesh_shape,
)
from pallas_kernels.context_parallel import ZIGZAG_MIXERS, zigzag_order

WORKER = Path(__file__).with_name("context_parallel_worker.py")
T, D = 64, 32     # the worker's sequence length and d_model
# Mixer groups (one model each, a layer per mixer) on the three meshes, as
# (data, fsdp, sequence, tensor), every exchanging mixer in both layouts, attention by
# all-gather or ring.
# EXCHANGING: every op of these mixers has its own exchange (linear ops: state summaries;
# attention, CCA, NSA: all-gathered or ringed K / V; MLA: its latents; short convs and CCA's
# convs: halos; Titans: a head split; Titans MAC: a pipeline).
EXCHANGING = {"attn,gated_deltanet,mamba2,kda,nsa": "1x1x8x1:zigzag",
              "attn,swa,gla,deltanet,conv,based": "2x1x4x1:ring",
              "conv,based,parallel,mom": "1x2x2x2:zigzag",
              "swa,gla,deltanet,mla,cca,ccgqa": "1x2x2x2:zigzag:ring",
              "mla,cca,nsa,parallel,mom": "2x1x4x1:absorb",   # MLA in its absorbed form
              # Titans and MAG: a head split (Ulysses), 4 heads over 4 sequence shards; MAC: a
              # pipeline (the state travels: layers/titans_mac_sharded.py). Persistent
              # tokens, on packed rows and on rows without documents; MAC also in its
              # token-by-token form (segments not a multiple of its memory's chunks), with
              # halos reaching several pieces back.
              "titans,titans_mag,titans_mac": "2x1x4x1:zigzag",
              "attn,swa,titans,titans_mag,titans_mac": "1x2x4x1:zigzag:unpacked",
              "titans_mac": "1x1x8x1:zigzag:tokenwise"}
# Mixers whose all-gather form gathers whole-length keys / values [B, T, Hkv, Dh] (parallel's
# default branches include full attention; a window takes a halo instead); NSA and Based's
# quadratic form gather them whatever the exchange. MLA's gathers are its latents [B, T, R]
# and [B, T, P].
KEYS_GATHERED = ("attn", "parallel", "cca", "ccgqa", "nsa", "based")
ALWAYS_GATHERED = ("nsa", "based")
MLA_LATENTS = (32, 8)       # MLAArgs' kv_lora_rank and qk_rope_head_dim (base.yaml)


@pytest.fixture(scope="module")
def worker_result():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    cases = [f"{m}@{mesh}" for m, mesh in EXCHANGING.items()]
    proc = subprocess.run([sys.executable, str(WORKER), "train:4", "lower:tpu,cuda", "windows",
                           "poison", *cases],
                          env=env,
                          text=True, capture_output=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mixers", list(EXCHANGING))
def test_sharded_sequence_equals_one_device(worker_result, mixers):
    """float32: the shards differ from one device only in summation order (chunk sizes of the
    slices, the fold of the summaries, the all-reduce of the gradients): logits <= 1e-6,
    gradients <= 1e-5 relative (the worker's gradient_error), the issue's bounds. Measured
    under the suite's XLA flags: logits <= 3.8e-7 and gradients <= 3.3e-6 (KDA's gates, whose
    gradient alone moves by 1e-5 on one device between chunk sizes 64 and 8)."""
    assert worker_result["devices"] == 8
    got = worker_result[f"{mixers}@{EXCHANGING[mixers]}"]
    assert got["zero_grads"] == 0
    assert got["logits"] <= 1e-6 and got["loss"] <= 1e-6, got
    assert got["grads"] <= 1e-5, got


@pytest.mark.slow
@pytest.mark.parametrize("mixers", list(EXCHANGING))
def test_exchanging_mixers_gather_no_whole_activation(worker_result, mixers):
    """No all-gather of an activation's whole time axis in the compiled train step (an array
    [.., T, ..] with at least d_model floats per token), except attention's keys and values
    [B, T, Hkv, Dh] in full attention's all-gather form (the ring passes blocks instead, a
    window takes a halo; NSA and Based's quadratic form always gather them) and MLA's latents
    [B, T, R] (R = d_model here). Narrower whole-length
    gathers are allowed: MoM's router weights [B, T, memories], which its per-row sort of
    (token, memory) pairs needs, and MLA's shared RoPE key [B, T, P]."""
    gathers = worker_result[f"{mixers}@{EXCHANGING[mixers]}"]["gathers"]
    wide = [s for s in gathers if math.prod(s[s.index(T) + 1:]) >= D]
    ring = "ring" in EXCHANGING[mixers].split(":")
    names = mixers.split(",")
    gathering = [m for m in names if m in KEYS_GATHERED and (m in ALWAYS_GATHERED or not ring)]
    keys = [s for s in wide if len(s) == 4 and s[1] == T]
    latents = [s for s in wide if len(s) == 3 and s[1:] == [T, MLA_LATENTS[0]]]
    assert bool(keys) == bool(gathering), (gathers, gathering)
    assert bool(latents) == ("mla" in names and not ring), gathers
    assert sorted(keys + latents) == sorted(wide), gathers


@pytest.mark.slow
def test_sliding_windows_take_halos_and_sinks(worker_result):
    """The attention op with a window on 8 sequence shards (context_parallel/window.py),
    packed rows and not, both layouts: halos of one hop and of several pieces (a window
    longer than a piece), sinks inside the halo and far before it (a document begun shards
    back): output and q / k / v gradients equal one device's to float32 summation order."""
    cases = worker_result["windows"]
    assert len(cases) == 5, cases
    for name, got in cases.items():
        assert got["values"] <= 1e-6 and got["grads"] <= 1e-5, (name, got)


@pytest.mark.slow
def test_nan_padding_stays_inert_across_shards(worker_result):
    """Packed rows whose padding holds NaN, crossing pieces (8 shards, both layouts): the
    linear ops' summaries, attention by all-gather, ring and window, and a conv's halo give
    finite outputs at real tokens and finite input gradients, equal to one device's on the
    same rows (measured: values <= 2.1e-7, gradients <= 2.8e-7)."""
    cases = worker_result["poison"]
    assert len(cases) == 14, cases
    for name, got in cases.items():
        assert got["finite"], (name, got)
        assert got["values"] <= 1e-6 and got["grads"] <= 1e-5, (name, got)


@pytest.mark.slow
def test_train_py_with_a_sequence_axis_logs_the_one_device_run(worker_result):
    """[attn, gated_deltanet] with mesh.sequence=4: the auto layout is zigzag (full causal
    attention), so this is the reordered batch end to end (lay_out_batch, positions)."""
    curves = worker_result["train"]
    for key in ("loss", "grad_norm"):
        assert len(curves["1"][key]) == 3
        for a, b in zip(curves["4"][key], curves["1"][key]):
            assert abs(a - b) <= 1e-5 * abs(b), (key, curves)


@pytest.mark.slow
def test_sharded_step_lowers_for_tpu_and_gpu(worker_result):
    """The zigzag loss-and-gradient step of a model with one mixer of each exchange (the
    worker's LOWERED: attention by ring, state summaries, MLA's latents, conv and window
    halos, NSA's rows, MAC's pipeline) on mesh (1, 1, 8, 1) with train.remat=offload,
    lowered from this CPU for each platform: 8 partitions, its all-gathers and collective
    permutes, and kept matmul outputs placed in pinned host memory (the offloaded remat
    composes with the sequence axis). (The ops inside the shards take their XLA forms here;
    the kernel backends are lowered on their own in tests/test_lowering.py.)"""
    for platform in ("tpu", "cuda"):
        got = worker_result["lowered"][platform]
        assert got["partitions"] == 8 and got["all_gathers"] > 0, got
        assert got["permutes"] > 0 and got["offloaded"] > 0, got


def test_zigzag_order_and_layout():
    order = zigzag_order(16, 2)             # 4 pieces of 4: shard 0 holds 0 and 3, shard 1 1, 2
    assert order.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]

    class FakeMesh:
        shape = {"data": 1, "fsdp": 1, "sequence": 2, "tensor": 1}

    seg = np.array([[1] * 6 + [2] * 10])
    batch = {"inputs": np.arange(16)[None], "segment_ids": seg}
    out = lay_out_batch(batch, FakeMesh(), "zigzag")
    assert out["inputs"].tolist() == [order.tolist()]
    # positions are the original order's in-document positions, reordered with the tokens
    want = np.array([list(range(6)) + list(range(10))])[:, order]
    np.testing.assert_array_equal(out["positions"], want)
    assert lay_out_batch(batch, FakeMesh(), "contiguous") is batch


def test_layout_choice_and_refusal(monkeypatch):
    def cfg(*over):
        return load_config(None, ["mesh.data=1", "mesh.sequence=2", *over])

    assert sequence_layout(cfg("model.mixers=[attn,gated_deltanet]")) == "zigzag"
    assert sequence_layout(cfg("model.mixers=[swa,gla]")) == "contiguous"   # no full attention
    assert sequence_layout(cfg("model.mixers=[attn,mla,nsa,titans_mac]")) == "zigzag"
    # Titans' memory runs by a head split: zigzag needs the shards to divide its heads.
    titans = ["model.n_heads=4", "model.mixers=[attn,titans_mag]", "mesh.sequence=8"]
    assert sequence_layout(cfg(*titans)) == "contiguous"
    assert sequence_layout(cfg(*titans, "model.mixer_args.titans_mag.n_heads=8")) == "zigzag"
    with pytest.raises(ConfigError, match="titans_mag runs by a head split, and mesh.sequence=8 "
                                          "does not divide its 4 heads"):
        cfg(*titans, "mesh.sequence_layout=zigzag")
    # Every registered mixer has an exchange that reads the layout; a mixer without one (one
    # registered later) would read the reordered row as the row, so zigzag refuses it.
    assert set(MIXERS) <= set(ZIGZAG_MIXERS)
    monkeypatch.setattr(config_check, "ZIGZAG_MIXERS",
                        tuple(m for m in ZIGZAG_MIXERS if m != "titans_mac"))
    assert sequence_layout(cfg("model.mixers=[attn,titans_mac]")) == "contiguous"
    with pytest.raises(ConfigError, match="mixer.s. titans_mac have no sequence exchange"):
        cfg("model.mixers=[attn,titans_mac]", "mesh.sequence_layout=zigzag")


def test_mesh_has_a_sequence_axis():
    assert resolve_mesh_shape((1, 1, -1, 2), 8) == (1, 1, 4, 2)
    mesh = make_mesh(load_config(None, ["mesh.data=1", "mesh.sequence=-1"]).mesh)
    assert tuple(mesh.shape) == ("data", "fsdp", "sequence", "tensor")


def test_bad_sequence_settings_are_one_clear_error():
    with pytest.raises(MeshError, match="sequence=3, tensor=1 needs 3 devices"):
        resolve_mesh_shape((1, 1, 3, 1), 1)
    with pytest.raises(Exception, match="mesh sizes must be >= 1 or -1.*sequence=0"):
        load_config(None, ["mesh.sequence=0"])

    class FakeMesh:
        shape = {"data": 1, "fsdp": 1, "sequence": 4, "tensor": 1}

    with pytest.raises(MeshError, match="data.seq_len=30 must be a multiple of mesh.sequence"):
        check_sequence(30, FakeMesh())
