"""Whether a kernel test runs a Pallas backend compiled or in the interpreter."""

import jax


def interpret(backend: str) -> bool:
    """Interpret mode unless the kernel's own platform runs these tests (JAX_PLATFORMS=cuda or
    tpu): then the same tests check the compiled kernels on the device."""
    platform = jax.default_backend()
    native = {"pallas": platform in ("gpu", "tpu"), "pallas_gpu": platform == "gpu",
              "pallas_tpu": platform == "tpu", "flash": platform == "gpu",
              "splash": platform == "tpu"}
    return not native.get(backend, False)
