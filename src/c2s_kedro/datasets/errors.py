"""The datasets' own errors: a ``DatasetError`` that Kedro reports as a dataset's failure, and a
``C2SError`` that ``kedro run`` prints as one line with its fix."""

from __future__ import annotations

from kedro.io import DatasetError

from c2s_kedro.core.errors import C2SError


class C2SDatasetError(C2SError, DatasetError):
    """A dataset refuses what it is given or cannot find (a missing file, a wrong setting), with the fix in its message."""
