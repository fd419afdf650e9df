"""Atomic output files: write beside the target under a temporary name, rename when complete.

A crash or a failed check therefore never leaves a half-written model or report behind, and an
existing file at the target path is only replaced by a complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lrdeploy.errors import LrdeployError


def check_output_folders(*targets: str | os.PathLike[str] | None) -> None:
    """Refuse outputs whose folder does not exist, before any work: a command that wrote its
    model and then failed on its report would leave half of what was asked."""
    for target in targets:
        if target is not None and not Path(target).parent.is_dir():
            raise LrdeployError(f"{target}: output folder {Path(target).parent} does not exist")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success."""
    target = Path(target)
    check_output_folders(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; a finished output gets the mode any new file would get.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(target: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays reach reports from the analysis; JSON has no type for them.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when both paths name the same file (after resolving links), existing or not."""
    return Path(a).resolve() == Path(b).resolve()
