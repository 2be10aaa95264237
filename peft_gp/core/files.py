"""Files peft_gp writes and reads: atomic writes (a reader sees the old file or the new one), format versions,
JSON parsed with size and depth limits, file hashes."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
import uuid


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


MAX_JSON_BYTES = 16 * 2**20  # peft_gp's JSON files and metadata are a few kB; anything this large is not one of them
MAX_JSON_DEPTH = 16


def _depth(value, limit: int) -> int:
    """The nesting depth of a parsed JSON value, computed without recursion (stops past ``limit``)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, level + 1) for child in item)
    return deepest


def parse_json(text: str | bytes, source: str, fix: str, max_depth: int = MAX_JSON_DEPTH):
    """Parse JSON with size and depth limits; any failure is a ``ValueError`` that names ``source`` and ``fix``."""
    if len(text) > MAX_JSON_BYTES:
        raise ValueError(f"{source} is {len(text)} bytes, more than any file peft_gp writes. {fix}")
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text)
    except UnicodeDecodeError as error:
        raise ValueError(f"{source} is not UTF-8 text ({error.reason} at byte {error.start}). {fix}") from None
    except RecursionError:
        raise ValueError(f"{source} is nested too deeply to be a peft_gp file. {fix}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not valid JSON ({error.msg}, line {error.lineno}). {fix}") from None
    if _depth(value, max_depth) > max_depth:
        raise ValueError(f"{source} is nested more than {max_depth} levels deep: not a peft_gp file. {fix}")
    return value


def read_json(path: str, fix: str, max_depth: int = MAX_JSON_DEPTH):
    """``parse_json`` of a file, its size checked before it is read."""
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise ValueError(f"{path} is {size} bytes, more than any file peft_gp writes. {fix}")
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ValueError(f"Cannot read {path} ({error.strerror or error}). {fix}") from None
    return parse_json(data, path, fix, max_depth)


def sha256_file(path: str) -> str:
    """The hex SHA-256 of a file's bytes (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _exchange(first: str, second: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


def _carry_over(old: str, new: str, managed: frozenset[str]) -> None:
    """Hard-link (else copy) into ``new`` the files of ``old`` that ``new`` lacks, except ``managed`` names."""
    for root, _, files in os.walk(old):
        for name in files:
            if name in managed or name.startswith(".tmp-"):
                continue
            source = os.path.join(root, name)
            target = os.path.join(new, os.path.relpath(source, old))
            if os.path.exists(target):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)


def replace_directory(
    source: str, target: str, managed: frozenset[str] = frozenset(), carry_over: bool = True
) -> None:
    """Put the complete folder ``source`` at ``target`` in one step: a reader sees the old folder or the new one.

    Files of the old ``target`` that the new one lacks are kept (unless ``carry_over`` is false), except the
    ``managed`` names (those the new save decides about: a stale memory must not survive beside a new adapter).
    Where the system has no atomic exchange of two folders, two renames do it (a kill between them leaves the old
    folder beside, named ``<target>.old-*``).
    """
    if not os.path.exists(target):
        os.rename(source, target)
        return
    if carry_over:
        _carry_over(target, source, managed)
    if _exchange(source, target):
        shutil.rmtree(source)  # the old folder, now at the temporary name
        return
    old = f"{target}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    os.rename(source, target)
    shutil.rmtree(old)


def sibling_temporary_folder(target: str) -> str:
    """A new empty folder beside ``target`` (same file system, so that it can be renamed into place)."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(os.path.abspath(target))}-", dir=parent)
