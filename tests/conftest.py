import os
import sys
from pathlib import Path

# Tests run from a checkout: make the top-level packages importable without an install too.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One CPU device per worker and no preallocation: xdist runs several workers side by side.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
