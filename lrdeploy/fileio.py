"""Atomic output files: write beside the target under a temporary name, rename when complete.

A crash or a failed check therefore never leaves a half-written model or report behind, and an
existing file at the target path is only replaced by a complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lrdeploy.errors import LrdeployError


def check_outputs(*targets: str | os.PathLike[str] | None,
                  inputs: Sequence[str | os.PathLike[str] | None] = ()) -> None:
    """Refuse, before any work, outputs that would lose something: one whose folder does not
    exist (a command that wrote its model and then failed on its report would leave half of
    what was asked), one that is an input file or lies in an input folder (an artifact), and
    one path given for two outputs (the second would replace the first)."""
    given = [Path(t) for t in targets if t is not None]
    sources = [Path(i).resolve() for i in inputs if i is not None]
    seen: set[Path] = set()
    for target in given:
        if not target.parent.is_dir():
            raise LrdeployError(f"{target}: output folder {target.parent} does not exist")
        if target.is_dir():
            raise LrdeployError(f"{target}: is a folder; give a file name for this output")
        resolved = target.resolve()
        for source in sources:
            if resolved == source or source in resolved.parents:
                what = "is the input" if resolved == source else "is inside the input folder"
                raise LrdeployError(f"{target}: {what} {source}; outputs never replace inputs: "
                                    "choose another path")
        if resolved in seen:
            raise LrdeployError(f"{target}: given for two outputs; the second would replace "
                                "the first")
        seen.add(resolved)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success."""
    target = Path(target)
    check_outputs(target)
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
