"""What the kernel libraries need to be told when backends.lowering_for(platform) lowers their
kernels for a device this machine lacks: each decides from the machine it runs on.

    deltanet-tpu  runs its kernels in the Pallas interpreter unless jax.default_backend() is
                  "tpu" (patched by lowering_for itself), and reads the TPU generation from the
                  abstract mesh lowering_for enters.
    jax-linear-attention  refuses its Mosaic GPU kernels unless jax.devices()[0] is an sm_90
                  GPU: its `is_hopper` checks answer True (the lowering's H100).
    tokamax       refuses kernels whose hardware is absent unless its own cross-compile switch
                  (tokamax.config.cross_compile) is on, and sizes its Mosaic GPU kernels from
                  jax.extend.backend.get_default_device() (compute capability, SM count):
                  answered by a stand-in for the lowering's H100.

The switches stay on for the whole block, since a custom VJP's backward is traced after the
forward call returns.
"""

from __future__ import annotations

import contextlib
import sys
import types
import unittest.mock

from pallas_kernels.backends import LOWERING_GPU, library_installed

# What a library asking for "the default device" sees while lowering for a GPU: an H100 SXM
# (backends.LOWERING_GPU; sm_90, 132 SMs).
LOWERING_DEVICE = types.SimpleNamespace(platform="gpu", device_kind=LOWERING_GPU, id=0,
                                        compute_capability="9.0", core_count=132)


def enter_lowering_switches(platform: str, stack: contextlib.ExitStack) -> None:
    """Enters, on `stack`, the switches of the installed libraries for lowering `platform`."""
    if platform == "gpu":
        # Registers Pallas's Mosaic GPU lowering, which a library's kernel (tokamax's sm_90
        # attention) may need before anything on a GPU would have imported it.
        import jax.experimental.pallas.mosaic_gpu  # noqa: F401
    if library_installed("tokamax"):
        import tokamax

        stack.enter_context(tokamax.config.cross_compile(True))
        if platform == "gpu":
            import jax.extend.backend

            stack.enter_context(unittest.mock.patch.object(
                jax.extend.backend, "get_default_device", lambda: LOWERING_DEVICE))
    if platform == "gpu" and library_installed("jla"):
        import jla.ops.mosaic_gpu  # noqa: F401  (loads the modules whose checks are patched)

        for name, module in list(sys.modules.items()):
            if name.startswith("jla.ops.mosaic_gpu") and hasattr(module, "is_hopper"):
                stack.enter_context(unittest.mock.patch.object(module, "is_hopper",
                                                               lambda: True))
