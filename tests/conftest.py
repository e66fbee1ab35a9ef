import os
import shutil
import subprocess
import sys
import tempfile
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
# One compilation cache for the whole run, shared by the xdist workers and the CLI subprocesses
# (train.py / generate.py runs compile the same small programs again and again): an identical
# program (same HLO, flags and jax version) is then compiled once. A fresh folder per run
# (xdist gives all workers of one run the same id), so nothing carries over between runs.
_run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"mnemax-test-jax-cache-{_run_id}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
    """The controller (not an xdist worker) removes the run's compilation cache it made."""
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _interpret_pallas_kernels():
    """Every test runs inside backends.interpret_kernels(): a Pallas kernel whose platform is
    not this machine's runs in the interpreter (how CPU checks the kernels' numbers); on its own
    platform (JAX_PLATFORMS=cuda or tpu) it compiles, so the same tests check the compiled
    kernel there. Tests of the refusal outside it use interpret_kernels(False)."""
    from pallas_kernels.backends import interpret_kernels  # after the environment above

    with interpret_kernels():
        yield
