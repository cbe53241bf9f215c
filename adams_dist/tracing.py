"""Whether the code running now is being traced by torch.compile in this thread.

``torch.compiler.is_compiling()`` is one flag for the whole process while a compile session runs, so eager
code on another thread (the training steps, while ``kernel="background"`` builds kernels in a thread) would
see True and take the traced branch. Here the flag counts only where this thread holds a tracing context.
"""

from __future__ import annotations

import torch


@torch.compiler.assume_constant_result  # evaluated once while tracing: a constant in the graph
def _this_thread_traces() -> bool:
    from torch._guards import TracingContext

    return TracingContext.try_get() is not None


def tracing() -> bool:
    """True while torch.compile traces the calling code in this thread."""
    return torch.compiler.is_compiling() and _this_thread_traces()
