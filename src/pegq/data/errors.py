"""The one exception type of :mod:`pegq.data`."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad data input: a missing file or folder, wrong columns, bad labels, an empty split, an unknown or
    excluded task, bad metric inputs.

    The message is one line that says what is wrong and how to fix it. Subclasses ``ValueError`` so that
    callers that already catch ``ValueError`` keep working.
    """
