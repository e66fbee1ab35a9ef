"""The backend vocabulary (pallas_kernels/backends.py): every op's names, what "auto" resolves
to on each platform and inside forward_only(), the refusals, the contexts, and that the layers'
Args and the ops speak the same vocabulary."""

import dataclasses
import re
import typing

import jax
import jax.numpy as jnp
import pytest

from layers.registry import MIXERS
from pallas_kernels import backends
from pallas_kernels.backends import (
    AUTO,
    AUTO_FORWARD,
    OP_BACKENDS,
    PLATFORMS,
    forward_only,
    interpret_kernels,
    lowering_for,
    resolve_backend,
)
from pallas_kernels.gated_delta_rule import gated_delta_rule


def test_every_op_has_an_auto_choice_it_takes_on_every_platform():
    for op, names in OP_BACKENDS.items():
        assert set(AUTO[op]) == set(PLATFORMS)
        for platform in PLATFORMS:
            assert AUTO[op][platform].backend in names and AUTO[op][platform].basis
            fwd = AUTO_FORWARD.get(op, {}).get(platform)
            assert fwd is None or fwd.backend in names


def test_auto_per_platform_and_forward_only():
    with interpret_kernels(False):
        training_choice = AUTO["gated_delta_rule"]["cpu"].backend
        assert resolve_backend("gated_delta_rule", "auto") == training_choice
        with forward_only():
            assert resolve_backend("gated_delta_rule", "auto") == "reference"
            assert resolve_backend("attention", "auto") == "xla"         # no forward entry
            assert resolve_backend("gated_delta_rule", "xla") == "xla"   # only auto changes
        assert resolve_backend("gated_delta_rule", "auto") == "xla"      # restored
        with lowering_for("tpu"):
            assert resolve_backend("attention", "auto") == "splash"
            assert resolve_backend("gla", "pallas") == "pallas_tpu"
            assert resolve_backend("linear_attention", "auto") == "xla"  # no library covers it
            with forward_only():                                         # no TPU forward entry
                assert resolve_backend("gla", "auto") == AUTO["gla"]["tpu"].backend
        with lowering_for("gpu"):
            assert resolve_backend("gla", "pallas") == "pallas_gpu"
            assert resolve_backend("attention", "flash") == "flash"


def test_refusals_name_what_is_wrong_and_what_is_allowed():
    with pytest.raises(ValueError, match="gla: unknown backend 'triton'; choose one of 'auto', "
                                         "'reference', 'xla', 'pallas', 'pallas_gpu', "
                                         "'pallas_tpu'"):
        resolve_backend("gla", "triton")
    with pytest.raises(ValueError, match="titans_memory: unknown backend 'pallas'"):
        resolve_backend("titans_memory", "pallas")
    with interpret_kernels(False):
        with pytest.raises(ValueError, match="attention: backend 'splash' is a TPU kernel and "
                                             "this is cpu.*interpret_kernels"):
            resolve_backend("attention", "splash")
    with interpret_kernels():
        assert resolve_backend("attention", "splash") == "splash"
        assert backends.kernel_interpret("splash") and not backends.kernel_interpret("xla")
    with pytest.raises(ValueError, match="platform must be 'gpu' or 'tpu'"):
        with lowering_for("cpu"):
            pass


def test_contexts_nest_and_restore():
    with interpret_kernels(False):
        assert not backends.interpreting()
        with interpret_kernels():
            assert backends.interpreting()
            with lowering_for("gpu"):
                assert backends.target_platform() == "gpu"
                assert not backends.kernel_interpret("pallas_gpu")     # its own platform
                assert backends.kernel_interpret("pallas_tpu")
            assert backends.target_platform() == jax.default_backend()
        assert not backends.interpreting()


def _literal_names(args_cls) -> tuple[str, ...]:
    field = {f.name: f for f in dataclasses.fields(args_cls)}["backend"]
    hint = typing.get_type_hints(args_cls)["backend"]
    assert field.default == "auto"
    return typing.get_args(hint)


_WITH_BACKEND = sorted(n for n, spec in MIXERS.items()
                       if "backend" in {f.name for f in dataclasses.fields(spec.cls.Args)})


def test_the_mixers_with_kernels_have_a_backend_setting():
    assert {"attn", "swa", "based", "gla", "deltanet", "gated_deltanet", "mom",
            "titans"} <= set(_WITH_BACKEND)


@pytest.mark.parametrize("name", _WITH_BACKEND)
def test_layer_args_take_the_names_of_the_op_they_call(name):
    args_cls = MIXERS[name].cls.Args
    names = set(_literal_names(args_cls)) - {"auto"}
    assert names in [set(v) for v in OP_BACKENDS.values()]


def test_table_lists_every_op_and_platform():
    rows = backends.backend_table().splitlines()[2:]
    assert len(rows) == len(OP_BACKENDS) * len(PLATFORMS)
    assert all(row.count("|") == 7 for row in rows)


def _scan_lengths(jaxpr) -> list[int]:
    return [int(n) for n in re.findall(r"length=(\d+)", str(jaxpr))]


def test_forward_only_takes_the_token_scan_on_cpu():
    b, t, h, k = 1, 40, 2, 8
    x = jnp.ones((b, t, h, k))
    g, beta = -0.1 * jnp.ones((b, t, h)), 0.5 * jnp.ones((b, t, h))
    op = lambda: gated_delta_rule(x, x, x, g, beta, chunk_size=16)[0]
    assert t not in _scan_lengths(jax.make_jaxpr(op)().jaxpr)            # chunked: N steps

    def forward():
        with forward_only():
            return op()

    assert t in _scan_lengths(jax.make_jaxpr(forward)().jaxpr)           # one step per token


def test_auto_skips_a_library_that_is_not_installed(monkeypatch):
    """A missing package: "auto" takes the table's fallback, a named backend says what to
    install."""
    with lowering_for("tpu"):
        assert AUTO["gated_delta_rule"]["tpu"].backend == "deltanet_tpu"
        monkeypatch.setitem(backends.LIBRARY_MODULE, "deltanet_tpu",
                            ("no_such_module_mnemax", "deltanet-tpu"))
        assert resolve_backend("gated_delta_rule", "auto") == "xla"
        with pytest.raises(ValueError, match="backend 'deltanet_tpu' needs the deltanet-tpu "
                                             "package, which is not installed"):
            resolve_backend("gated_delta_rule", "deltanet_tpu")


def test_every_library_choice_has_a_fallback_of_ours():
    for op, by_platform in AUTO.items():
        for choice in by_platform.values():
            if choice.backend in backends.LIBRARY_MODULE:
                assert choice.fallback in OP_BACKENDS[op]
                assert choice.fallback not in backends.LIBRARY_MODULE
