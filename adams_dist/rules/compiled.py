"""torch.compile of a rule's update function, fused with each tensor's decay into one pass over memory.

One code object per (rule, pieces per call), and per rule one for state stored as 8-bit codes (decoded and
encoded inside the kernel), compiled once per process with dynamic shapes. The scalars (lr,
step, hyperparameters and what the rule derives from them) are kernel inputs, not constants, so a
new step or learning rate reuses the kernel instead of compiling another.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import threading
import types
from collections.abc import Callable
from typing import Any

import torch

from .. import quant8, spectral

# Below this many elements a compiled call's fixed cost (guards, wrappers) exceeds what fusion saves.
COMPILED_MIN_NUMEL = 1 << 15
# Pieces per compiled call (kernel="compiled"). More pay Dynamo's per-call cost fewer times (AdamW at 2.1M
# params on one core: 2.13x fused AdamW with 1, 1.85x with 4, 1.65x with 16; benchmarks/group_bench.py), but
# the build time grows with the pieces in a graph (6-9 s a piece for the atan2 rules); calls with the same
# piece counts share one graph.
GROUP_PIECES = 4
# Inductor stores an intermediate to memory once it grows past a few dozen ops or reads (atan2's
# polynomial does), and a stored intermediate splits the kernel into two passes; these keep each
# update one loop. Options this torch does not know are left out.
_ONE_LOOP = {name: 10_000 for name in ("realize_opcount_threshold", "realize_cpu_opcount_threshold",
                                       "realize_reads_threshold", "realize_acc_reads_threshold",
                                       "realize_cpu_acc_reads_threshold")}

_compiled_cache: dict[tuple, Callable] = {}


def compile_supported(device: torch.device) -> bool:
    """Whether torch.compile can build kernels here: Triton for CUDA, a C++ compiler for CPU."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    if device.type == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    return False


def map_tensors(args: tuple, fn: Callable[[torch.Tensor], Any]) -> tuple:
    """``args`` with ``fn(t)`` for each tensor ``t``, also inside tuples, in order."""
    return tuple(map_tensors(a, fn) if isinstance(a, tuple) else fn(a) if isinstance(a, torch.Tensor) else a
                 for a in args)


def without_bases(args: tuple) -> tuple:
    """``args`` with each tensor detached: the same memory, no longer a view. Dynamo guards on a view's
    base, so views of differently shaped bases (a flat shard, a 2-D weight) would each compile a kernel
    of their own."""
    return map_tensors(args, torch.Tensor.detach)


def compiled_kernel(name: str, rule_fn: Callable, flat: int, rank1: int) -> Callable:
    """Decay + update of several big tensors in one compiled call: ``flat`` flat pieces, then
    ``rank1`` pieces under spectral decay; ``update`` is what ``rule_fn`` returned for this step.

    Called as ``kernel(flat_pieces, rank1_pieces, update)``. A flat piece is ``(p, tensors, keep)``:
    ``p = keep * p + update(*tensors)``. A rank-1 piece is ``(p, tensors, wv, vt, coef)`` over
    ``(heads, rows, cols)`` views: ``p = p - coef * wv * vt + update(*tensors)``; the spectral decay costs
    no pass over memory of its own. Inductor writes one loop per piece; Dynamo's guards and wrappers
    (about 90 us a call on one CPU core) are paid once per call. The scalars ``update`` closes over are
    kernel inputs, computed in Python once per call: scalar math traced into the kernel would run once per
    vector of elements (``pow`` under -fmath-errno is not hoisted out of the loop).
    """
    key = (rule_fn, flat, rank1)
    if key not in _compiled_cache:
        def kernel(flat_pieces, rank1_pieces, update: Callable) -> None:
            for p, tensors, keep in flat_pieces:
                p.mul_(keep).add_(update(*tensors))
            for p, tensors, wv, vt, coef in rank1_pieces:
                spectral.rank1_(p, wv, vt, coef)
                p.add_(update(*tensors))

        _compiled_cache[key] = _compile(kernel, f"{name}_{flat}_flat_{rank1}_rank1_kernel")
    return _compiled_cache[key]


def compiled_8bit_kernel(name: str, rule_fn: Callable) -> Callable:
    """The update of one big tensor whose state is 8-bit codes (``moment_dtype="8bit"``, quant8.py), in one
    compiled call: decode, ``p = keep * p + update(g, *state)``, encode, with no float copy of the state
    in memory.

    Called as ``kernel(p, g, codes, scales, tables, keep, update)`` on ``(blocks, BLOCK)`` views of whole
    blocks: per state tensor its codes, scales and ``(TABLE, first, above)`` tables. The codes and scales are
    written in place. ``keep`` is a scalar decay; a spectral one is applied before (its rows span blocks).
    """
    key = (rule_fn, "8bit")
    if key not in _compiled_cache:
        def kernel(p, g, codes, scales, tables, keep, update: Callable) -> None:
            state = [quant8.decode_blocks(c, s, table[0], p.dtype) for c, s, table in zip(codes, scales, tables)]
            p.mul_(keep).add_(update(g, *state))  # update changes the decoded state in place
            for x, c, s, table in zip(state, codes, scales, tables):
                quant8.encode_blocks_(x, c, s, table[1], table[2])

        # Every table index is in range by construction (a code, or the top 16 bits of a float32 >= 0), so the
        # per-vector bounds checks go: the 8 table reads per element are most of this kernel's time (-20%).
        _compiled_cache[key] = _compile(kernel, f"{name}_8bit_kernel", assert_indirect_indexing=False)
    return _compiled_cache[key]


def _compile(kernel: Callable, kind: str, **extra_options: Any) -> Callable:
    """torch.compile of ``kernel`` as a code object of its own named ``kind`` (torch.compile caps the graphs
    kept per code object), with dynamic shapes and the options that keep each update one loop."""
    import torch._inductor.config as inductor_config

    options: dict[str, Any] = {k: v for k, v in {**_ONE_LOOP, **extra_options}.items() if hasattr(inductor_config, k)}
    # No on-disk graph cache: where a scalar is both a kernel input and baked in as a constant (a
    # beta used by mul_ and by addcmul_'s value=), it served a kernel compiled for another value.
    options["fx_graph_cache"] = False
    # Let the C++ compiler contract a * b + c into one FMA (inductor turns that off by default): the
    # rules' polynomials and moment updates are half as many vector ops, and each FMA rounds once.
    options["cpp.enable_floating_point_contract_flag"] = "fast"
    code = kernel.__code__.replace(co_name=kind)
    kernel = types.FunctionType(code, kernel.__globals__, kind, kernel.__defaults__, kernel.__closure__)
    compiled = torch.compile(kernel, dynamic=True, fullgraph=True, options=options)
    _widen_lowp_loops_in_builds()

    @functools.wraps(compiled)
    def run(*args: Any) -> Any:
        _building.ours = True  # a build, if this call traces, steps our bf16 loops at full width
        try:
            return compiled(*args)
        finally:
            _building.ours = False

    return run


_building = threading.local()  # .ours: this thread is in one of our kernels' calls (and builds)


def _widen_lowp_loops_in_builds() -> None:
    """Inductor's CPU code steps a loop by one vector of float32 unless every node of the kernel has bf16 in
    it; in our kernels the copy of the updated fp32 master into its storage has none. A kernel with bf16
    moments then loads and stores them as half vectors with masked moves: 2-3x slower than the same kernel
    with fp32 moments on an AVX-512 host, where a loop stepped by a whole bf16 vector is faster than
    fp32 (AdamW kernel, 4M elements: 2.1 vs 2.4 ms; benchmarks/moment_kernel_bench.py). So in our
    builds, and in no other thread's, a pointwise kernel that holds one low-precision float type steps by
    that type's vector (two float32 vectors a step), where its loop is at least that long and holds no bit
    cast. Inductor's own choice everywhere else, and in a torch whose inductor lacks these internals."""
    try:
        from torch._inductor import virtualized
        from torch._inductor.codegen import cpp
        select, lowp_of, bodies_of = cpp.TilingSelect.select_tiling, cpp.get_loop_body_lowp_fp, cpp._get_loop_body
        pick_isa = cpp.cpu_vec_isa.pick_vec_isa
    except (ImportError, AttributeError):
        return
    if getattr(select, "widens_lowp", False):
        return

    def select_tiling(self, fn_list, var_sizes_list):  # type: ignore[no-untyped-def]
        chosen = select(self, fn_list, var_sizes_list)  # (factors, indices[, stats]), by torch version
        if not getattr(_building, "ours", False):
            return chosen
        try:
            wide = _lowp_width(chosen[0], chosen[1], fn_list, var_sizes_list)
        except Exception:  # an inductor whose internals differ: its own choice
            return chosen
        return chosen if wide is None else ([wide], *chosen[1:])

    def _lowp_width(factors, indices, fn_list, var_sizes_list):  # type: ignore[no-untyped-def]
        """The loop width to use instead of ``factors``, or None to keep them."""
        if len(factors) != 1 or any(red for _, red in var_sizes_list):
            return None
        bodies = bodies_of(fn_list)
        lowp = {lowp_of(body)[0] for body in bodies} - {None}
        isa = pick_isa()
        if len(lowp) != 1 or factors[0] != isa.nelements(dtype=torch.float32):
            return None
        blocks = [block for body in bodies for block in (body.root_block, *body.subblocks.values())]
        if any(n.target == "to_dtype_bitcast" for block in blocks for n in block.graph.nodes):
            return None  # bit casts (the 8-bit quantizer's bucket and sign) become scalar loops at that width
        wide = isa.nelements(dtype=lowp.pop())
        sizes = max(var_sizes_list, key=lambda s: len(s[0]))[0]
        if virtualized.V.graph.sizevars.optimization_hint(sizes[indices[0]], fallback=0) < wide:
            return None
        return wide

    select_tiling.widens_lowp = True  # type: ignore[attr-defined]
    cpp.TilingSelect.select_tiling = select_tiling  # type: ignore[method-assign]


def one_graph_per_shape_kind() -> contextlib.AbstractContextManager:
    """Where a compiled kernel may be traced (built): without Dynamo's duck sizing, which would give equal
    sizes one symbol and guard on the equality, so that a square matrix and a rectangular one would each
    build a kernel. Entered once per group of calls, not per call (it costs about 45 us), and never
    around calls that cannot trace: the setting is global to the process, not to a thread."""
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(use_duck_shape=False)  # type: ignore[attr-defined]
