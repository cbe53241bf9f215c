"""Checkpoint files: plain data only, CRC-32 checksums, atomic writes, and reads that never run code.

A file is written to a temporary name in the target's directory, fsynced, then renamed over the
target, so the path always holds a complete checkpoint. It is read with
``torch.load(weights_only=True, mmap=True)``; anything else in the file is refused.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import tempfile
import zlib
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: truncated, corrupt, unsafe, or made for another model/optimizer."""



_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_MAPPINGS = (dict, collections.OrderedDict)
_SEQUENCES = (list, tuple, set)


def check_plain(obj: Any, where: str) -> None:
    """Raise TypeError naming the first object ``torch.load(weights_only=True)`` could not restore."""
    kind = type(obj)
    if kind in _LEAVES:
        return
    if isinstance(obj, torch.Tensor):
        if kind not in (torch.Tensor, torch.nn.Parameter) or obj.layout != torch.strided or obj.is_meta:
            raise TypeError(f"{where} is a {kind.__name__} (layout {obj.layout}, device {obj.device}); "
                            "checkpoints hold plain dense tensors only")
        return
    if kind in _MAPPINGS:
        for key, value in obj.items():
            if type(key) not in _LEAVES:
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            check_plain(value, f"{where}[{key!r}]")
        return
    if kind in _SEQUENCES:
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) "
                    "cannot restore without running code; store tensors, numbers, strings, lists, tuples and "
                    "dicts (e.g. .item() for numpy scalars, .state_dict() for objects)")


def to_cpu(obj: Any) -> Any:
    """Tensors moved to the CPU, detached, and cloned where they view a larger storage (saved whole otherwise)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            return t.cpu()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            return t.clone()
        return t
    kind = type(obj)
    if kind in _MAPPINGS:
        return kind((k, to_cpu(v)) for k, v in obj.items())
    if kind in _SEQUENCES:
        return kind(to_cpu(v) for v in obj)
    return obj


def _raw_bytes(t: torch.Tensor) -> ctypes.Array:
    """A contiguous CPU tensor's bytes, without a copy and without numpy."""
    return (ctypes.c_ubyte * (t.numel() * t.element_size())).from_address(t.data_ptr())


def checksum(obj: Any, crc: int = 0) -> int:
    """CRC-32 over the structure and every tensor's bytes, in traversal order (deterministic after loading)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        crc = zlib.crc32(f"T{t.dtype}{tuple(t.shape)}".encode(), crc)
        if t.numel():
            crc = zlib.crc32(_raw_bytes(t), crc)
        return crc
    kind = type(obj)
    if kind in _MAPPINGS:
        crc = zlib.crc32(f"D{len(obj)}".encode(), crc)
        for key, value in obj.items():
            crc = checksum(value, zlib.crc32(repr(key).encode(), crc))
        return crc
    if kind in (list, tuple):
        crc = zlib.crc32(f"{kind.__name__[0]}{len(obj)}".encode(), crc)
        for value in obj:
            crc = checksum(value, crc)
        return crc
    if kind is set:
        return zlib.crc32(repr(sorted(repr(v) for v in obj)).encode(), crc)
    return zlib.crc32(f"{kind.__name__}:{obj!r}".encode(), crc)


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.tmp-"


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temps(path: str) -> None:
    """Remove temporary files left by earlier saves to ``path`` that were killed mid-write."""
    directory, prefix = os.path.dirname(path), _temp_prefix(path)
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if name.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temp file in the target's directory, fsync, then os.replace: all or nothing."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        with contextlib.suppress(OSError, AttributeError):
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def read(path: str) -> Any:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a directory, not a checkpoint file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save's zip container; anything else is damaged or another format
        raise CheckpointError(f"cannot read checkpoint {path!r}: not a torch.save zip archive "
                              f"({'empty file' if not magic else 'bad header'}); the file is truncated or corrupt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # miniz, unpickler and EOF errors all mean the same thing to the user
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"refusing to load {path!r}: its pickle holds something other than tensors and plain data, "
                "which could run code from the file (or the file is corrupt); it was not written by "
                f"save_checkpoint. torch.load said: {' '.join(str(e).split())[:400]}"
            ) from e
        raise CheckpointError(f"cannot read checkpoint {path!r}: the file is truncated or corrupt "
                              f"({type(e).__name__}: {first})") from e
