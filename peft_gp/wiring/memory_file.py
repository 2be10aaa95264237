"""Reading ``gp_memory.safetensors``: every field of its metadata and every basis checked before use.

A memory that loads decides what is protected, so nothing in it is taken on trust: the format version, the number of
tasks stored (equal to the number of thresholds, each finite and in (0, 1]), the layer dimensions, and each basis
(float32, ``(d, k)`` with ``k ≤ d``, finite, orthonormal; empty when no task is stored), and which groups share a
stored basis (``gp_shared``, from version 3: each maps to a stored basis of its own dimension), and which stored
tensors are a basis's orthonormal complement (``gp_complements``, from version 4; the basis is rebuilt from it with
``maths.complement``). A file that fails any check raises ``GPMemoryError`` naming the file, what is wrong and the fix.
"""

from __future__ import annotations

import math

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from ..core import maths
from ..core.files import newer_format_message, parse_json

# 2: optional SGP importances beside the bases (version-1 files have none and still load); 3: a basis shared by groups
# that read the same inputs is stored once, ``gp_shared`` maps the other groups to it (older files: one per group);
# 4: a basis filling more than half its space is stored as its complement, listed in ``gp_complements``
FORMAT_VERSION = 4
IMPORTANCE_SUFFIX = "#importance"  # key of a basis's importances: its name and this suffix
DAMAGED = "It may be truncated or damaged: restore it from an earlier checkpoint or save."


class GPMemoryError(ValueError):
    """A memory file or state that does not fit the model, or cannot be read."""


def _header_metadata(data: bytes, path: str) -> dict[str, str]:
    if len(data) < 8:
        raise GPMemoryError(f"{path} is {len(data)} bytes: not a safetensors file. {DAMAGED}")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise GPMemoryError(f"{path}: its header claims {size} bytes, the file has {len(data) - 8}. {DAMAGED}")
    try:
        header = parse_json(data[8 : 8 + size], f"The header of {path}", DAMAGED, max_depth=4)
    except ValueError as error:
        raise GPMemoryError(str(error)) from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise GPMemoryError(f"{path} has no valid gp metadata: it was not written by peft_gp.")
    return metadata


def _field(metadata: dict[str, str], key: str, path: str):
    if key not in metadata:
        raise GPMemoryError(f"{path} lacks the gp metadata field {key!r}: it was not written by peft_gp.")
    try:
        return parse_json(metadata[key], f"The metadata field {key!r} of {path}", DAMAGED, max_depth=2)
    except ValueError as error:
        raise GPMemoryError(str(error)) from None


def _whole(value, key: str, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GPMemoryError(f"{path}: metadata {key} must be a whole number ≥ {minimum}, got {value!r}. {DAMAGED}")
    return value


def read_metadata(metadata: dict[str, str], path: str) -> tuple[dict[str, int], list[float], dict[str, str]]:
    """The checked layer dims, thresholds (one per stored task) and other ``gp_*`` info of a memory file."""
    version = _whole(_field(metadata, "gp_format_version", path), "gp_format_version", path, 1)
    newer = newer_format_message(path, "memory", version, FORMAT_VERSION)
    if newer:
        raise GPMemoryError(newer)
    tasks = _whole(_field(metadata, "gp_tasks_seen", path), "gp_tasks_seen", path, 0)
    thresholds = _field(metadata, "gp_thresholds", path)
    if not isinstance(thresholds, list) or len(thresholds) != tasks:
        raise GPMemoryError(
            f"{path} records {tasks} task(s) stored but thresholds {thresholds!r}: there must be one threshold per "
            f"task. {DAMAGED}"
        )
    for value in thresholds:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GPMemoryError(f"{path}: threshold {value!r} is not a finite number. {DAMAGED}")
        if not 0.0 < value <= 1.0:
            raise GPMemoryError(f"{path}: threshold {value!r} is outside (0, 1]. {DAMAGED}")
    dims = _field(metadata, "gp_dims", path)
    if not isinstance(dims, dict) or not dims:
        raise GPMemoryError(f"{path}: metadata gp_dims must map layer names to dimensions, got {dims!r}. {DAMAGED}")
    dims = {str(name): _whole(dim, f"gp_dims[{name!r}]", path, 1) for name, dim in dims.items()}
    info = {key[3:]: value for key, value in metadata.items() if key.startswith("gp_")}
    for key in ("format_version", "tasks_seen", "thresholds", "dims", "shared", "complements"):
        info.pop(key, None)
    return dims, [float(t) for t in thresholds], info


def read_shared(metadata: dict[str, str], dims: dict[str, int], path: str) -> dict[str, str]:
    """``{group: stored group}`` of a version-3 file: every group named is a recorded layer, the target holds its own
    basis (no chains) of the same dimension. Older files store one basis per group: ``{}``."""
    if int(metadata["gp_format_version"]) < 3:
        return {}
    shared = _field(metadata, "gp_shared", path)
    if not isinstance(shared, dict):
        raise GPMemoryError(f"{path}: metadata gp_shared must map layer names to layer names, got {shared!r}. "
                            f"{DAMAGED}")
    for name, target in shared.items():
        if name not in dims or target not in dims or target in shared or dims[name] != dims[target]:
            raise GPMemoryError(
                f"{path}: gp_shared maps {name!r} to {target!r}, which is not a stored basis of a recorded layer of "
                f"the same dimension. {DAMAGED}"
            )
    return shared


def read_complements(metadata: dict[str, str], stored: set[str], importances: dict, path: str) -> list[str]:
    """The stored names of a version-4 file whose tensor is a basis's complement: each a stored basis, once, without
    importances (they belong to the basis's own directions). Older files: ``[]``."""
    if int(metadata["gp_format_version"]) < 4:
        return []
    complements = _field(metadata, "gp_complements", path)
    if not isinstance(complements, list) or not all(isinstance(name, str) for name in complements):
        raise GPMemoryError(f"{path}: metadata gp_complements must list layer names, got {complements!r}. {DAMAGED}")
    for name in complements:
        if name not in stored or name in importances or complements.count(name) > 1:
            raise GPMemoryError(
                f"{path}: gp_complements names {name!r}, which is not a stored basis without importances. {DAMAGED}"
            )
    return complements


def check_bases(
    tensors: dict[str, torch.Tensor], dims: dict[str, int], tasks: int, path: str, complements: list[str]
) -> None:
    """Every basis (or complement) fits its recorded layer, is finite and orthonormal; none holds directions with no
    task stored. ``dims``: the layers whose bases the file stores (the others share one of them)."""
    if set(tensors) != set(dims):
        raise GPMemoryError(f"{path}: the bases {sorted(tensors)[:4]} do not match the recorded layers. {DAMAGED}")
    for name, basis in tensors.items():
        if basis.dtype != torch.float32:
            raise GPMemoryError(f"{path}: basis {name!r} has dtype {basis.dtype}, expected torch.float32.")
        if basis.dim() != 2 or basis.shape[0] != dims[name] or basis.shape[1] > dims[name]:
            raise GPMemoryError(f"{path}: basis {name!r} has shape {tuple(basis.shape)}, expected ({dims[name]}, k).")
        if not torch.isfinite(basis).all():
            raise GPMemoryError(f"{path}: basis {name!r} holds NaN or inf; the file is damaged.")
        if maths.orthonormality_error(basis) > 1e-3:
            raise GPMemoryError(f"{path}: basis {name!r} is not orthonormal; the file is damaged.")
        directions = dims[name] - basis.shape[1] if name in complements else basis.shape[1]
        if tasks == 0 and directions > 0:
            raise GPMemoryError(
                f"{path} records no stored task, but basis {name!r} holds {directions} direction(s): the metadata "
                f"does not match the bases. {DAMAGED}"
            )


def split_importances(tensors: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Take the importances out of ``tensors`` (left with the bases); each one checked against its basis: float32,
    one finite value in [0, 1] per direction."""
    importances = {}
    for key in [key for key in tensors if key.endswith(IMPORTANCE_SUFFIX)]:
        name, importance = key[: -len(IMPORTANCE_SUFFIX)], tensors.pop(key)
        basis = tensors.get(name)
        if basis is None or importance.dtype != torch.float32 or tuple(importance.shape) != (basis.shape[-1],):
            raise GPMemoryError(
                f"{path}: importances {key!r} do not fit a basis (one float32 per direction expected). {DAMAGED}"
            )
        if not torch.isfinite(importance).all() or importance.min() < 0 or importance.max() > 1:
            raise GPMemoryError(f"{path}: importances {key!r} are not all in [0, 1]. {DAMAGED}")
        importances[name] = importance
    return importances


def read_memory_file(path: str) -> tuple:
    """The checked ``(dims, bases, thresholds, info, importances, complements)`` of a memory file; ``complements``
    maps each group whose basis was stored as its complement to ``(basis, complement)``."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise GPMemoryError(f"Cannot read the memory file {path} ({error.strerror or error}).") from None
    metadata = _header_metadata(data, path)
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError) as error:
        raise GPMemoryError(f"{path} is not a readable gp memory file ({error}). {DAMAGED}") from None
    dims, thresholds, info = read_metadata(metadata, path)
    shared = read_shared(metadata, dims, path)
    tensors = dict(tensors)
    importances = split_importances(tensors, path)
    complements = read_complements(metadata, set(tensors), importances, path)
    stored = {name: dim for name, dim in dims.items() if name not in shared}
    check_bases(tensors, stored, len(thresholds), path, complements)
    pairs = {}
    for name in complements:  # the basis rebuilt from its complement, as the memory built it before saving
        pairs[name] = (maths.complement(tensors[name]).to(torch.float32), tensors[name])
        tensors[name] = pairs[name][0]
    for name, target in shared.items():  # one tensor for the groups that share it
        tensors[name] = tensors[target]
        for found in (importances, pairs):
            if target in found:
                found[name] = found[target]
    return dims, tensors, thresholds, info, importances, pairs
