"""Files written whole or not at all, with the user's umask. Nothing heavy imported: the local
sweep launcher (gam_rl/launcher.py) writes results.json with these in a process without torch."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    """Floats that JSON cannot hold (inf, nan) become strings, so files stay valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def umask() -> int:
    """The process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_mode(path: Path, directory: bool = False) -> None:
    """Give a file made by tempfile (0600, or 0700 for a folder) the mode the user's umask gives a
    new file (0666 & ~umask, or 0777 & ~umask): a sweep folder on a shared file system stays
    readable by the group when the umask allows it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def unwritable(folder: Path) -> str | None:
    """Why no file or folder can be made at `folder` (which may not exist yet), or None: its nearest existing
    ancestor must be a folder where a temporary folder can be made and removed (a permission check alone
    passes root everywhere, /proc included)."""
    ancestor = Path(folder).expanduser().absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".gam_rl_check_", dir=ancestor))  # made, then removed at once
    except OSError as err:
        return f"no folder can be made in {ancestor} ({err.strerror or err})"
    return None


def atomic_write_lines(path: Path, lines) -> int:
    """Write lines (strings, each without its newline) to a temporary file in the same folder with the
    umask's mode, then rename: readers see all or nothing, and a failure leaves no temporary file behind.
    Returns how many lines were written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    count = 0
    try:
        shared_mode(Path(tmp))
        with os.fdopen(fd, "w") as f:
            for line in lines:
                f.write(line + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def atomic_write_json(path: Path, obj: dict) -> None:
    """Write to a temporary file in the same folder, then rename: readers see all or nothing."""
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=False)
    atomic_write_lines(path, [text])
