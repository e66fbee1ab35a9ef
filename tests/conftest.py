import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests run from a checkout: make the top-level packages importable without an install too.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One CPU device per worker and no preallocation: xdist runs several workers side by side.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU compiles dominate this suite (small shapes, many distinct programs). LLVM
# optimization level 0 makes them much cheaper and runs the same HLO, so what is computed (and
# every tolerance) stays. Subprocesses (train.py / generate.py CLI tests) inherit it; a user's
# own runs keep XLA's defaults. An XLA that does not know a flag aborts the process, so each is
# probed once (by the controller; xdist workers inherit the environment) and dropped if refused.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0",)


def _accepted(flag: str) -> bool:
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}",
               JAX_PLATFORMS="cpu")
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                           capture_output=True, timeout=120)
    return probe.returncode == 0


if "PYTEST_XDIST_WORKER" not in os.environ:
    for _flag in TEST_XLA_FLAGS:
        if _flag not in os.environ.get("XLA_FLAGS", "") and _accepted(_flag):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
# No persistent compilation cache: with jaxlib 0.11.2, XLA:CPU's executable serialization
# (the cache write) segfaulted on some of this suite's larger programs (the packed-model
# tests), taking an xdist worker down; every process compiles its own programs instead.
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")


@pytest.fixture(autouse=True)
def _interpret_pallas_kernels():
    """Every test runs inside backends.interpret_kernels(): a Pallas kernel whose platform is
    not this machine's runs in the interpreter (how CPU checks the kernels' numbers); on its own
    platform (JAX_PLATFORMS=cuda or tpu) it compiles, so the same tests check the compiled
    kernel there. Tests of the refusal outside it use interpret_kernels(False)."""
    from pallas_kernels.backends import interpret_kernels  # after the environment above

    with interpret_kernels():
        yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop jax's compiled programs. An xdist worker compiles hundreds
    of programs over a run; with jaxlib 0.11.2 a long-lived worker segfaulted inside XLA:CPU
    (compiling or serializing a large packed-model program, late in a run) where the same test
    alone passed. Keeping each worker's live executables to one module's is the mitigation;
    later modules recompile what they share."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()

