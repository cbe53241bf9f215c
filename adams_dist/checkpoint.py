"""Checkpoints that survive restarts, world-size changes and crashes.

``save_checkpoint(path, model, optimizer, **extra)`` writes one file with the model's ``state_dict()``,
the optimizer's full (unsharded, world-size independent) ``state_dict()``, the extras and metadata;
``load_checkpoint(path, model, optimizer)`` restores them at any world size and returns the extras.
Both are collective over the optimizer's process group: every rank calls them.

- Saving: every rank takes part in ``optimizer.state_dict()`` (an all-gather); rank 0 writes the file
  through a temporary file in the same directory, ``fsync`` and ``os.replace``, so ``path`` always holds
  either the previous complete checkpoint or the new one.
- Loading: every rank reads the file (a filesystem shared by the ranks is assumed) with
  ``torch.load(weights_only=True, mmap=True)``, which never runs code from the file, checks it
  (format, checksums, parameter names and shapes, optimizer class and state) and agrees with the
  other ranks before anything changes; a problem on any rank raises on every rank.

See docs/checkpoints.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint_files import CheckpointError, atomic_save, check_plain, checksum, read, to_cpu
from .comm import all_gather_json
from .optimizer import ShardedOptimizer
from .spectral import SpectralShape
from .version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT = "adams_dist.checkpoint"
FORMAT_VERSION = 1
_SECTIONS = ("model", "optimizer", "extra")


# ---------------------------------------------------------------------------------------------- context


@dataclass(frozen=True)
class _Ctx:
    group: Any | None
    rank: int
    world: int
    device: torch.device


def _context(optimizer: torch.optim.Optimizer) -> _Ctx:
    """The process group the optimizer works over (ShardedOptimizer: its own; otherwise the default one)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    device = params[0].device if params else torch.device("cpu")
    if isinstance(optimizer, ShardedOptimizer):
        return _Ctx(optimizer.process_group, optimizer.rank, optimizer.world_size, optimizer.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _Ctx(None, dist.get_rank(), dist.get_world_size(), device)
    return _Ctx(None, 0, 1, device)


def _agree(ctx: _Ctx, error: BaseException | None, what: str) -> None:
    """Raise on every rank if ``error`` is set on any rank (one small all-reduce when all went well)."""
    if ctx.world == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.group)
    if int(flag.item()) == 0:
        return
    reports = all_gather_json(None if error is None else [type(error).__name__, str(error)], ctx.group)
    if error is not None:
        raise error
    rank, (kind, message) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)
    text = f"{what} failed on rank {rank} ({kind}): {message}"
    if kind == "FileNotFoundError":
        raise FileNotFoundError(text)
    raise CheckpointError(text)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DistributedDataParallel / DataParallel / torch.compile wrappers (portable names)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


# ---------------------------------------------------------------------------------------------- payload


def _fingerprint(model: torch.nn.Module) -> list[list[Any]]:
    return [[name, list(p.shape), str(p.dtype).replace("torch.", "")] for name, p in model.named_parameters()]


def _optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str | None]:
    names = {id(p): name for name, p in model.named_parameters()}
    return [names.get(id(p)) for g in optimizer.param_groups for p in g["params"]]


def _spectral_layout(optimizer: torch.optim.Optimizer) -> list[list[int] | None]:
    """[heads, rows, cols] per optimizer parameter with spectral decay (Adams), with a 1 appended for
    heads that are column blocks; else None."""
    spectral = isinstance(optimizer, ShardedOptimizer) and optimizer.uses_spectral_decay
    out: list[list[int] | None] = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            shape = SpectralShape.of(p) if spectral else None
            columns = [1] if shape is not None and shape.columns else []
            out.append(None if shape is None else [shape.heads, shape.rows, shape.cols, *columns])
    return out


def _describe_layout(layout: list[int] | None) -> str:
    if layout is None:
        return "no spectral decay"
    heads, rows, cols = layout[:3]
    blocks = " (column blocks)" if len(layout) > 3 else ""
    return f"spectral decay on {heads} head{'s' if heads != 1 else ''} of {rows} x {cols}{blocks}"


def _payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim_state: dict[str, Any],
             extra: dict[str, Any], world: int) -> dict[str, Any]:

    sections = {"model": model.state_dict(), "optimizer": optim_state, "extra": extra}
    for name, section in sections.items():
        check_plain(section, name)
    sections = {name: to_cpu(section) for name, section in sections.items()}
    rule = getattr(optimizer, "rule", None)
    master_dtype = getattr(optimizer, "master_dtype", None)
    metadata = {
        "world_size": world,
        "torch_version": str(torch.__version__),
        "adams_dist_version": __version__,
        "optimizer_class": type(optimizer).__name__,
        "rule": getattr(rule, "name", None),
        "master_dtype": None if master_dtype is None else str(master_dtype).replace("torch.", ""),
        "params": _fingerprint(model),
        "optimizer_params": _optimizer_param_names(model, optimizer),
        "spectral": _spectral_layout(optimizer),
        "checksums": {name: checksum(section) for name, section in sections.items()},
    }
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "metadata": metadata, **sections}


# ---------------------------------------------------------------------------------------------- validation


def _describe_differences(kind: str, saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    problems = []
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing:
        problems.append(f"{kind} missing from the checkpoint: {_short(missing)}")
    if unexpected:
        problems.append(f"{kind} in the checkpoint but not in the model: {_short(unexpected)}")
    for key in current:
        if key in saved and tuple(saved[key]) != tuple(current[key]):
            problems.append(f"{kind[:-1]} {key!r} has shape {tuple(saved[key])} in the checkpoint "
                            f"but {tuple(current[key])} in the model")
    return problems


def _short(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _validate(payload: Any, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an adams_dist checkpoint (no '{FORMAT}' format marker); "
                              "it was not written by adams_dist.checkpoint.save_checkpoint")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(f"{path!r} has checkpoint format version {version!r}; this adams_dist reads "
                              f"versions 1..{FORMAT_VERSION} (upgrade adams_dist to read newer checkpoints)")
    meta = payload.get("metadata")
    if not isinstance(meta, dict) or any(name not in payload for name in _SECTIONS):
        raise CheckpointError(f"{path!r} lacks its metadata or one of the sections {_SECTIONS}: corrupt file")
    checksums = meta.get("checksums", {})
    for name in _SECTIONS:
        if checksums.get(name) != checksum(payload[name]):
            raise CheckpointError(f"{path!r}: checksum mismatch in the {name!r} section; the file is corrupt")

    # The model: parameter names and shapes, then every state-dict entry (buffers included).
    problems = _describe_differences(
        "parameters", {n: s for n, s, _ in meta["params"]}, {n: list(p.shape) for n, p in model.named_parameters()}
    )
    saved_sd, current = payload["model"], model.state_dict()
    if not problems:
        if not isinstance(saved_sd, dict):
            raise CheckpointError(f"{path!r}: the model section is not a state dict")
        problems = _describe_differences(
            "state-dict entries",
            {k: list(v.shape) if isinstance(v, torch.Tensor) else [] for k, v in saved_sd.items()},
            {k: list(v.shape) if isinstance(v, torch.Tensor) else [] for k, v in current.items()},
        )
    if problems:
        raise CheckpointError(f"checkpoint {path!r} was made for a different model: " + "; ".join(problems[:5]))
    # model.load_state_dict copies the other entries before it reports one that is not a tensor
    wrong = [k for k, v in saved_sd.items() if isinstance(current[k], torch.Tensor) and not isinstance(v, torch.Tensor)]
    if wrong:
        raise CheckpointError(f"checkpoint {path!r}: the model entries {_short(wrong)} are not tensors (malformed)")

    # The optimizer: class, which model parameter each optimizer slot holds, then its state dict.
    saved_class, mine = meta.get("optimizer_class"), type(optimizer).__name__
    if saved_class != mine:
        raise CheckpointError(f"checkpoint {path!r} holds {saved_class} state; this optimizer is a {mine}")
    saved_names, names = meta.get("optimizer_params", []), _optimizer_param_names(model, optimizer)
    if len(saved_names) != len(names):
        raise CheckpointError(f"checkpoint {path!r} has optimizer state for {len(saved_names)} parameters; "
                              f"this optimizer has {len(names)}")
    for i, (was, now) in enumerate(zip(saved_names, names)):
        if was != now:
            raise CheckpointError(f"optimizer parameter #{i} is {now!r} here but was {was!r} when {path!r} was "
                                  "saved; build the optimizer over the same parameters in the same order")
    for i, (saved_layout, layout) in enumerate(zip(meta.get("spectral", []), _spectral_layout(optimizer))):
        if saved_layout != layout:
            raise CheckpointError(
                f"optimizer parameter #{i} ({names[i]!r}) had {_describe_layout(saved_layout)} when {path!r} was "
                f"saved but has {_describe_layout(layout)} here; call adams_dist.set_heads / set use_spectral_decay as "
                "in the run that saved it"
            )
    osd = payload["optimizer"]
    try:
        if isinstance(optimizer, ShardedOptimizer):
            optimizer.validate_state_dict(osd)  # the engine's own checks, which change nothing
        else:
            _validate_generic_optimizer_state(osd, optimizer)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r}: the optimizer state does not fit this optimizer: {e}") from e


def _validate_generic_optimizer_state(osd: Any, optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(osd, dict) or "state" not in osd or "param_groups" not in osd:
        raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
    groups = osd["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{len(groups)} param groups saved, this optimizer has {len(optimizer.param_groups)}")
    for gi, (saved, mine) in enumerate(zip(groups, optimizer.param_groups)):
        if len(saved["params"]) != len(mine["params"]):
            raise ValueError(f"param group {gi}: {len(saved['params'])} params saved, {len(mine['params'])} here")


# ---------------------------------------------------------------------------------------------- API


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    **extra: Any) -> None:
    """Save model, optimizer and ``extra`` (e.g. ``scheduler=scheduler.state_dict(), step=step``) to ``path``.

    Collective: every rank of the optimizer's process group must call it. Rank 0 writes atomically (temp
    file in the same directory, fsync, ``os.replace``); when this returns on any rank, the file is complete.
    Extras must be tensors, numbers, strings, bytes, None, lists, tuples, sets and dicts of those (what
    ``torch.load(weights_only=True)`` restores); anything else raises TypeError naming it, and nothing is written.
    A failure on rank 0 raises there and a CheckpointError on the other ranks.
    """
    path = os.path.abspath(os.fspath(path))
    model = _unwrap(model)
    ctx = _context(optimizer)
    optim_state = optimizer.state_dict()  # collective for ShardedOptimizer: every rank gathers the full state
    error: BaseException | None = None
    if ctx.rank == 0:
        try:
            atomic_save(_payload(model, optimizer, optim_state, extra, ctx.world), path)
        except Exception as e:
            error = e
    _agree(ctx, error, f"saving checkpoint {path!r}")


def load_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore ``model`` and ``optimizer`` from ``path`` (saved at any world size); return the extras.

    Collective: every rank calls it and reads the file itself (a filesystem shared by the ranks is
    assumed). The file is read with ``torch.load(weights_only=True)``, so it never runs code from the
    file. Everything is checked before anything changes: a missing file raises FileNotFoundError; a
    truncated, corrupt or unsafe file, or one made for a model or optimizer with other parameter
    names, shapes or order, raises CheckpointError (a ValueError). A problem on any rank raises on every
    rank. Restore a scheduler with ``scheduler.load_state_dict(extra["scheduler"])``.
    """
    path = os.path.abspath(os.fspath(path))
    model = _unwrap(model)
    ctx = _context(optimizer)
    payload: Any = None
    error: BaseException | None = None
    try:
        payload = read(path)
        _validate(payload, path, model, optimizer)
    except (FileNotFoundError, CheckpointError) as e:
        error, payload = e, None
    except Exception as e:  # e.g. hand-edited metadata of the wrong shape
        error, payload = CheckpointError(f"checkpoint {path!r} is malformed ({type(e).__name__}: {e})"), None
        error.__cause__ = e
    _agree(ctx, error, f"loading checkpoint {path!r}")
    with torch.no_grad():
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    extra: dict[str, Any] = payload["extra"]
    return extra

