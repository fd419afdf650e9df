"""The one exception type that means "the user gave us something we cannot use".

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class LrdeployError(Exception):
    """A user-facing error: bad input file, bad option, a model that failed verification."""
