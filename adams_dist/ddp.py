"""A model wrapped in DistributedDataParallel: turn off DDP's gradient all-reduce, and warn when it is left on.

ZeRO mode averages the gradients itself (one reduce-scatter per bucket), so DDP's all-reduce in
backward only doubles the gradient traffic. Frameworks (HF Trainer, accelerate, Lightning) wrap the
model in DDP themselves; :func:`ddp_without_allreduce` keeps their wrapper and drops its all-reduce.

Detection: torch keeps DDP's gradient hooks in C++, invisible from a parameter, so at its first
distributed ``step()`` the optimizer looks once through the live objects for DDP modules (tens of
milliseconds, once) and warns if one owns its parameters and still all-reduces. No hook is
installed: a hook removed later would make a compiled train step recompile.
"""

import gc
import warnings
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["ddp_without_allreduce"]

_SILENCED: weakref.WeakSet[DistributedDataParallel] = weakref.WeakSet()  # DDP modules given the no-op hook


# Real (not postponed) annotations: DDP's register_comm_hook compares them with dist.GradBucket and Future.
def _keep_local(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's local gradients, unchanged and already complete (no communication)."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def ddp_without_allreduce(model: DistributedDataParallel) -> DistributedDataParallel:
    """Make ``model`` (a DistributedDataParallel module) leave each rank's gradients local, and return it.

    Its backward then communicates nothing, and an adams_dist optimizer in distributed mode averages
    the gradients itself, once. Use it when a framework wraps your model in DDP; call it before the
    first backward, on every rank. Calling it again on the same module does nothing. Do not use it
    with an optimizer that expects DDP's averaged gradients (torch's AdamW, for one).
    """
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"ddp_without_allreduce takes a torch.nn.parallel.DistributedDataParallel module, "
                        f"got {type(model).__name__}")
    if model not in _SILENCED:
        model.register_comm_hook(None, _keep_local)  # torch raises if another comm hook is registered
        _SILENCED.add(model)
    return model


def warn_if_allreducing(opt: Any) -> None:
    """Warn once if a live DDP module owns ``opt``'s parameters and still all-reduces their gradients."""
    ours = {id(p) for g in opt.param_groups for p in g["params"]}
    for model in gc.get_objects():
        if (issubclass(type(model), DistributedDataParallel) and model not in _SILENCED  # type(): dead weak proxies
                and any(id(p) in ours for p in model.parameters())):
            warnings.warn(
                f"{type(opt).__name__}'s parameters belong to a DistributedDataParallel module that still "
                "all-reduces every gradient, and the optimizer averages them again: the gradient traffic is "
                "doubled. Call adams_dist.ddp_without_allreduce(model) on the DDP module (before backward, "
                "on every rank), or do not wrap the model in DDP.", UserWarning, stacklevel=3)
            return
