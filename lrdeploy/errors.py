"""The one exception type that means "the user gave us something we cannot use".

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class LrdeployError(Exception):
    """A user-facing error: bad input file, bad option, a model that failed verification."""


class LrdeployWarning(UserWarning):
    """Something the user should know that does not stop the job (printed as one line)."""


def warn(message: str) -> None:
    import warnings

    warnings.warn(message, LrdeployWarning, stacklevel=2)
