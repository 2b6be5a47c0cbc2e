"""The errors the project raises on purpose.

Every error whose message was written for the user (a setting to change, an input to fix, a
refused overwrite, with what to do) is a ``C2SError``. ``kedro run`` prints such an error as one
line (``c2s_kedro.cli``); any other exception is a bug or a library's failure and keeps its
traceback. Each built-in kind has its subclass here, so that code and tests that catch
``ValueError``, ``KeyError``... still catch the project's errors.
"""

from __future__ import annotations


class C2SError(Exception):
    """Base of every error the project raises on purpose: its message says what is wrong and what to change."""


class C2SValueError(C2SError, ValueError):
    """A value the project refuses (a setting, an input's content), with the fix in its message."""


class C2SKeyError(C2SError, KeyError):
    """Something named that is not there (a column, a catalog entry, a label), with the fix in its message."""


class C2STypeError(C2SError, TypeError):
    """An argument of the wrong kind given to a project function, with the fix in its message."""


class C2SIndexError(C2SError, IndexError):
    """A position outside what exists (a template index), with the fix in its message."""


class C2SRuntimeError(C2SError, RuntimeError):
    """A machine or environment the project cannot work on, with why in its message."""
