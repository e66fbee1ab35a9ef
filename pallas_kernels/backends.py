"""One backend vocabulary for every op, what "auto" means on each platform, and the two contexts
that change where kernels are built for (`lowering_for`) and how they run (`interpret_kernels`).

Names (an op takes the subset OP_BACKENDS lists for it):
    "reference"   the readable definition: a token-by-token lax.scan (linear ops, Titans) or a
                  dense per-head loop (attention); float32.
    "xla"         the portable fast form in jax.numpy: chunkwise-parallel (linear ops, Titans),
                  dense masked softmax (attention).
    "pallas"      our Pallas kernel for the target platform; "pallas_gpu" / "pallas_tpu" name
                  a driver outright (the chunked ops' state sweep, pallas_kernels/state_passing).
    "flash"       our Pallas GPU flash attention (pallas_kernels/attention/flash.py).
    "splash"      jax's TPU splash attention (pallas_kernels/attention/splash.py).
    "cudnn"       NVIDIA's cuDNN flash attention through jax.nn.dot_product_attention.
    "deltanet_tpu", "jla", "tokamax"
                  the field's kernel libraries behind our signatures (pallas_kernels/libraries):
                  deltanet-tpu's Pallas TPU delta rules and GLA, jax-linear-attention's Mosaic
                  GPU (Hopper) kernels, tokamax's attention kernels (Mosaic TPU / GPU, Triton)
                  and its KDA (Mosaic TPU).
    "auto"        AUTO[op][platform] below.

A kernel library's backend is one more name: a line in OP_BACKENDS for each op it covers, its
platform in KERNEL_PLATFORM, its import name in LIBRARY_MODULE, and the AUTO entries it should
win, each with the fallback that runs where the library is not installed or does not take the
call (a head dim, a dtype, packed documents: its adapter says why, and "auto" moves on; a
backend named outright refuses the call with that reason instead).

A kernel whose platform is not the target (a GPU kernel on this CPU) is refused with one error,
except inside `interpret_kernels()`, where it runs in the Pallas interpreter (how CPU tests
check every kernel's numbers), or inside `lowering_for(platform)`, which builds it for that
platform so it can be lowered (not run) from a CPU (tests/test_lowering.py).

Both contexts are read when a function is traced: a function jitted inside one keeps what it
saw there in its compiled form, like any other trace-time Python state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import threading
import unittest.mock
from collections.abc import Iterator
from typing import Literal, get_args

import jax

# The names a layer's Args may hold (configs check them against these Literals).
# linear_attention (Based) takes our backends only: no kernel library has it.
OwnLinearBackend = Literal["auto", "reference", "xla", "pallas", "pallas_gpu", "pallas_tpu"]
LinearBackend = Literal["auto", "reference", "xla", "pallas", "pallas_gpu", "pallas_tpu",
                        "deltanet_tpu", "jla", "tokamax"]      # tokamax: kda only
AttentionBackend = Literal["auto", "reference", "xla", "flash", "splash", "cudnn", "tokamax"]
TitansBackend = Literal["auto", "reference", "xla"]
NSABackend = Literal["auto", "reference", "xla", "pallas", "pallas_gpu", "pallas_tpu"]

_OURS = tuple(b for b in get_args(OwnLinearBackend) if b != "auto")
# The ops each library covers: deltanet-tpu's chunk_gdn / chunk_delta_rule / chunk_gla (GLA with
# a per-channel or a per-head gate) / chunk_kda, jax-linear-attention's gated_deltanet /
# deltanet / gla / simple_gla / kda. Neither has plain (ungated) linear attention.
_LIBRARY_LINEAR_OPS = ("gla", "simple_gla", "delta_rule", "gated_delta_rule", "kda")
_LINEAR_OPS = ("linear_attention", *_LIBRARY_LINEAR_OPS)
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "attention": tuple(b for b in get_args(AttentionBackend) if b != "auto"),
    "linear_attention": _OURS,
    **{op: (*_OURS, "deltanet_tpu", "jla") for op in _LIBRARY_LINEAR_OPS},
    "kda": (*_OURS, "deltanet_tpu", "jla", "tokamax"),     # tokamax.ops.kimi_delta_attention
    "titans_memory": tuple(b for b in get_args(TitansBackend) if b != "auto"),
    "nsa": tuple(b for b in get_args(NSABackend) if b != "auto"),
}

# The platform a kernel backend compiles for ("pallas" means the target platform's own).
# tokamax is absent: it picks its implementation per platform itself (its XLA one on a CPU).
KERNEL_PLATFORM = {"pallas_gpu": "gpu", "pallas_tpu": "tpu", "flash": "gpu", "splash": "tpu",
                   "cudnn": "gpu", "deltanet_tpu": "tpu", "jla": "gpu"}
# The module a library backend imports (lazily, when it runs) and the pip name that installs it.
LIBRARY_MODULE = {"deltanet_tpu": ("deltanet_tpu", "deltanet-tpu"),
                  "jla": ("jla", "jax-linear-attention"),
                  "tokamax": ("tokamax", "tokamax")}
PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class AutoChoice:
    """What "auto" picks for one op on one platform, and what that choice rests on."""

    backend: str
    basis: str
    # What runs instead where `backend` is a library that is not installed or does not take
    # the call (pallas_kernels/libraries: a head dim, a dtype, packed documents).
    fallback: str | None = None


def library_installed(backend: str) -> bool:
    """Whether a library backend's package can be imported (True for our own backends)."""
    if backend not in LIBRARY_MODULE:
        return True
    return importlib.util.find_spec(LIBRARY_MODULE[backend][0]) is not None


_CHUNKED_ON_CPU = "measured (benchmarks/ops.py): chunked fwd+bwd beats the token scan's"
_UNMEASURED_KERNEL = ("our Pallas kernel is lowered in CI but has not run on a device, so the "
                      "XLA form stays the default")
_SCAN_ON_CPU = "measured (benchmarks/ops.py): the token scan's forward beats chunked"

_DELTANET_TPU = ("deltanet-tpu's Pallas TPU kernels (fused intra-chunk work, forward and "
                 "backward), by its authors' TPU numbers; not measured by us; else xla")
_JLA = ("jax-linear-attention's Mosaic GPU kernels on Hopper, by its authors' H100 numbers "
        "(GDN fwd+bwd 1.7-2.7x flash-linear-attention's Triton); not measured by us; bf16, "
        "K, V in {64, 128}; else xla")

AUTO: dict[str, dict[str, AutoChoice]] = {
    "attention": {
        "cpu": AutoChoice("xla", "the only path that compiles on CPU"),
        "gpu": AutoChoice("cudnn", "NVIDIA's cuDNN flash attention through jax; not measured by "
                          "us; bf16/fp16 without sinks or packed documents, else xla",
                          fallback="xla"),
        "tpu": AutoChoice("splash", "jax's own TPU kernel, packed documents and sinks included; "
                          "not measured by us"),
    },
    "linear_attention": {"cpu": AutoChoice("xla", _CHUNKED_ON_CPU),
                         "gpu": AutoChoice("xla", _UNMEASURED_KERNEL),
                         "tpu": AutoChoice("xla", _UNMEASURED_KERNEL)},
    **{op: {"cpu": AutoChoice("xla", _CHUNKED_ON_CPU),
            "gpu": AutoChoice("jla", _JLA, fallback="xla"),
            "tpu": AutoChoice("deltanet_tpu", _DELTANET_TPU, fallback="xla")}
       for op in _LIBRARY_LINEAR_OPS},
    "titans_memory": {p: AutoChoice("xla", "the chunked form; Titans has no kernel yet")
                      for p in PLATFORMS},
    "nsa": {"cpu": AutoChoice("xla", "the gathered form (cost n l' + w + T / d per query); "
                              "the only one that compiles on CPU"),
            "gpu": AutoChoice("xla", _UNMEASURED_KERNEL),
            "tpu": AutoChoice("xla", _UNMEASURED_KERNEL)},
}

# Where a call that is never differentiated (inside `forward_only()`: prefill, evaluation) is
# better served by another backend than training is; missing entries fall back to AUTO.
AUTO_FORWARD: dict[str, dict[str, AutoChoice]] = {
    op: {"cpu": AutoChoice("reference", _SCAN_ON_CPU)}
    for op in _LINEAR_OPS
}


_STATE = threading.local()


def target_platform() -> str:
    """The platform kernels are built for: jax.default_backend(), or the one a `lowering_for`
    block names."""
    return getattr(_STATE, "platform", None) or jax.default_backend()


def interpreting() -> bool:
    """Whether kernels off their platform run in the Pallas interpreter (`interpret_kernels`)."""
    return getattr(_STATE, "interpret", False)


@contextlib.contextmanager
def _setting(name: str, value) -> Iterator[None]:
    previous = getattr(_STATE, name, None)
    setattr(_STATE, name, value)
    try:
        yield
    finally:
        setattr(_STATE, name, previous)


# The GPU a `lowering_for("gpu")` block lowers for: Triton lowering reads the target's compute
# capability from the device, and a CPU has none, so the block names one (the lent machines'
# H100; an H200 is the same sm_90 target).
LOWERING_GPU = "NVIDIA H100"
# The TPU a `lowering_for("tpu")` block lowers for: Mosaic reads the generation (VMEM size, MXU
# shape) from the abstract mesh's device when no TPU is attached.
LOWERING_TPU = "TPU v5p"


@contextlib.contextmanager
def lowering_for(platform: str, device_kind: str | None = None) -> Iterator[None]:
    """Inside this block the ops build their kernels for `platform` ("gpu" or "tpu") instead
    of refusing them on a CPU: for lowering a function for a device this machine lacks,

        with lowering_for("gpu"):
            jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))

    which runs the Pallas -> Triton / Mosaic lowering with its resource checks (shared memory,
    VMEM, block shapes) without executing anything. "auto" resolves as on that platform. On a
    machine without that platform the block also enters an abstract mesh whose device is
    `device_kind` (default LOWERING_GPU / LOWERING_TPU): jax's Triton and Mosaic lowerings
    take the target device from there; `jax.default_backend()` answers `platform`; and the
    installed kernel libraries get their cross-compile switches (libraries/lowering.py).

    Raises:
        ValueError: a platform other than "gpu" or "tpu".
    """
    if platform not in ("gpu", "tpu"):
        raise ValueError(f"lowering_for: platform must be 'gpu' or 'tpu'; got {platform!r}")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_setting("platform", platform))
        if jax.default_backend() != platform:
            default_kind = LOWERING_GPU if platform == "gpu" else LOWERING_TPU
            device = jax.sharding.AbstractDevice(device_kind=device_kind or default_kind,
                                                 num_cores=None if platform == "gpu" else 1,
                                                 platform=platform)
            mesh = jax.sharding.AbstractMesh((1,), ("lowering",), abstract_device=device,
                                             axis_types=(jax.sharding.AxisType.Auto,))
            stack.enter_context(jax.sharding.use_abstract_mesh(mesh))
            stack.enter_context(unittest.mock.patch.object(jax, "default_backend",
                                                           lambda: platform))
            from pallas_kernels.libraries.lowering import enter_lowering_switches
            enter_lowering_switches(platform, stack)
        yield


def forward_only():
    """Inside this block "auto" may pick a backend that is faster without a backward pass
    (AUTO_FORWARD): for calls that are never differentiated, such as a decode cache's prefill
    or an evaluation step. Enter it inside the traced function, so that a jitted training
    step never sees it."""
    return _setting("forward_only", True)


def interpret_kernels(enabled: bool = True):
    """Inside this block a Pallas kernel whose platform is not this machine's runs in the
    Pallas interpreter (slow; how the CPU tests check the kernels' numbers). On the kernel's
    own platform it still compiles, so the same tests check the compiled kernel there."""
    return _setting("interpret", bool(enabled))


def needs_interpreter(backend: str) -> bool:
    """True when `backend` (a resolved name) is a kernel that must run in the interpreter
    here: its platform is not the target platform."""
    kernel_platform = KERNEL_PLATFORM.get(backend)
    return kernel_platform is not None and kernel_platform != target_platform()


def auto_backend(op: str, platform: str | None = None, forward: bool | None = None) -> str:
    """The backend "auto" means for `op` on `platform` (default: the target platform), for a
    forward-only call if `forward` (default: inside `forward_only()`)."""
    platform = platform or target_platform()
    forward = getattr(_STATE, "forward_only", False) if forward is None else forward
    if forward and platform in AUTO_FORWARD.get(op, {}):
        choice = AUTO_FORWARD[op][platform]
    else:
        choice = AUTO[op].get(platform, AUTO[op]["cpu"])
    if choice.fallback is not None and not library_installed(choice.backend):
        return choice.fallback
    return choice.backend


def auto_fallback(op: str, backend: str) -> str:
    """What "auto" runs for `op` when the library `backend` it chose does not take a call."""
    for table in (AUTO_FORWARD.get(op, {}), AUTO[op]):
        for choice in table.values():
            if choice.backend == backend and choice.fallback is not None:
                return choice.fallback
    raise ValueError(f"{op}: backend {backend!r} has no fallback in the AUTO table")


def resolve_backend(op: str, backend: str) -> str:
    """`backend` for `op` as the name of what will run: "auto" from the AUTO table, "pallas" as
    the target platform's driver ("pallas_gpu" / "pallas_tpu").

    Raises:
        ValueError: a name `op` does not take (the message lists those it does), or a kernel
            for another platform outside `interpret_kernels()` / `lowering_for()`.
    """
    allowed = OP_BACKENDS[op]
    if backend == "auto":
        backend = auto_backend(op)
    elif backend not in allowed:
        choices = ", ".join(repr(b) for b in ("auto", *allowed))
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {choices}")
    platform = target_platform()
    if backend == "pallas":
        backend = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
    if not library_installed(backend):
        module, package = LIBRARY_MODULE[backend]
        raise ValueError(f"{op}: backend {backend!r} needs the {package} package, which is not "
                         f"installed (pip install {package}, or mnemax's 'gpu' / 'tpu' extra)")
    if needs_interpreter(backend) and not interpreting():
        raise ValueError(
            f"{op}: backend {backend!r} is a {KERNEL_PLATFORM[backend].upper()} kernel and this "
            f"is {platform}; use backend 'xla' (or 'auto'), or run inside "
            "pallas_kernels.backends.interpret_kernels() to use the (slow) Pallas interpreter")
    return backend


def kernel_interpret(backend: str) -> bool:
    """The `interpret=` flag for a resolved kernel backend's pallas_call."""
    return needs_interpreter(backend) and interpreting()


def backend_table() -> str:
    """The AUTO and AUTO_FORWARD tables as Markdown rows: README and benchmarks."""
    rows = ["| op | platform | backends | auto | auto, forward only | why |",
            "|---|---|---|---|---|---|"]
    for op, by_platform in AUTO.items():
        for platform in PLATFORMS:
            choice = by_platform[platform]
            fwd = AUTO_FORWARD.get(op, {}).get(platform, choice)
            why = choice.basis if fwd is choice else f"{choice.basis}; {fwd.basis}"
            rows.append(f"| {op} | {platform} | {', '.join(OP_BACKENDS[op])} | "
                        f"{choice.backend} | {fwd.backend} | {why} |")
    return "\n".join(rows)
