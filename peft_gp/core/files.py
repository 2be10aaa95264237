"""Files peft_gp writes and reads: atomic writes (a reader sees the old file or the new one), format versions."""

from __future__ import annotations

import os
import tempfile


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def newer_format_message(source: str, what: str, found: int, supported: int) -> str | None:
    """The error text for a file written by a newer peft_gp (``None`` when this one reads ``found``)."""
    if found <= supported:
        return None
    return (
        f"{source} has {what} format version {found}, newer than this peft_gp reads ({supported}). "
        "Upgrade peft_gp: pip install -U peft-gp."
    )
