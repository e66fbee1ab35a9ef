"""The single exception type of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input (missing path, empty or too-short stream, out-of-range ids, ...).

    The message is one line that names the offending path or setting and what is allowed, so
    the command-line entry points can print it as-is and exit.
    """
