"""Research ablations of Adam's per-element second moment, for AdamATan2 and AdamW (one process only).

The "Adam beyond rotation invariance" line of work asks which part of Adam's advantage over SGD comes from
the per-element (coordinate-wise) second moment. Two knobs, both param-group hyperparameters:

- ``second_moment``: ``"element"`` (Adam, the default), ``"row"``, ``"column"`` or ``"tensor"``. A parameter is
  viewed as a matrix ``G`` of ``rows = prod(shape[:-1])`` by ``cols = shape[-1]``; ``v`` is the EMA of the
  mean of ``G**2`` over the shared axis (``row``: one value per row, the mean over its columns;
  ``column``: one per column; ``tensor``: one for the whole tensor) and broadcasts back in the denominator.
  ``v`` is allocated with the reduced shape, so its memory shrinks from ``rows*cols`` to ``rows``, ``cols``
  or 1 values. Parameters with fewer than 2 dims have no rows and columns: ``"row"`` and ``"column"``
  leave them per element; ``"tensor"`` shares one value over them.
- ``rotate`` (with ``rotation_seed``): Adam in a fixed random basis of each matrix. Orthogonal ``Q_L``
  (rows x rows) and ``Q_R`` (cols x cols) are drawn once, at construction, by :func:`rotation_matrices`;
  each step rotates the gradient ``G' = Q_L^T G Q_R``, keeps ``m`` and ``v`` in that basis (``second_moment``
  applies there), and rotates the update back, ``U = Q_L U' Q_R^T``, before it is applied to the weights
  (decoupled weight decay ``p *= 1 - lr*wd`` acts on the weights as usual). Costs ``rows**2 + cols**2``
  state values and two matrix products per step on each side. Parameters with fewer than 2 dims are not
  rotated.

Both run through a per-tensor path (plain torch ops, no compiled kernel); parameters whose group keeps the
defaults (``"element"``, no rotation) take the engine's usual path untouched. With a process group of more
than one rank or DTensor (FSDP2) parameters the optimizer refuses them at construction.

State: ``exp_avg_sq`` has the reduced shape (the parameter's shape with the shared dims set to 1, as
``keepdim=True`` gives), and rotated parameters hold ``rotation_left`` / ``rotation_right``. All of them
appear in ``state_dict()``; the rotation matrices are saved (not re-derived from the seed), so a resumed
run continues in exactly the same basis whatever the torch version or device. Loading requires a state
dict saved with the same ``second_moment``, ``rotate`` and (when rotating) ``rotation_seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SECOND_MOMENTS = ("element", "row", "column", "tensor")
KEYS = ("second_moment", "rotate", "rotation_seed")
RULES = ("atan2", "adamw")  # Rule.name of the rules these options exist for
_SEED_STRIDE = 1_000_003  # generator seed of parameter #i: rotation_seed * _SEED_STRIDE + i
MAX_SEED = 2**31 - 1

Config = tuple[str, bool, int]


def validate_group(group: dict[str, Any], supported: bool) -> None:
    """Check a param group's ablation options (ValueError with the offending value)."""
    if not supported:
        if group.get("second_moment", "element") != "element" or group.get("rotate", False):
            raise ValueError("second_moment/rotate are options of AdamATan2 and AdamW only")
        return
    mode = group.get("second_moment")
    if mode not in SECOND_MOMENTS:
        choices = ", ".join(map(repr, SECOND_MOMENTS))
        raise ValueError(f"Invalid second_moment value: {mode!r} (must be one of {choices})")
    if not isinstance(group.get("rotate"), bool):
        raise ValueError(f"Invalid rotate value: {group.get('rotate')!r} (must be True or False)")
    seed = group.get("rotation_seed")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED):
        raise ValueError(f"Invalid rotation_seed value: {seed!r} (must be an int in [0, {MAX_SEED}])")


def config(group: dict[str, Any]) -> Config:
    """The options that fix a group's state layout (the seed only matters when rotating)."""
    rotate = bool(group.get("rotate", False))
    return str(group.get("second_moment", "element")), rotate, int(group.get("rotation_seed", 0)) if rotate else 0


def is_default(group: dict[str, Any]) -> bool:
    return config(group)[:2] == ("element", False)


def check_single_process(groups: list[dict[str, Any]], sharded: str | None) -> None:
    """Raise NotImplementedError when a group asks for an ablation and the state is ``sharded`` (its description)."""
    if sharded is None or all(is_default(g) for g in groups):
        return
    where = sharded
    raise NotImplementedError(f"second_moment/rotate ablations run in one process only; this optimizer has {where}. "
                              "Build it without a process group (or with one of size 1) to use them.")


def check_default_layout(groups: list[dict[str, Any]], option: str) -> None:
    """Raise ValueError when a group asks for an ablation, whose state layouts ``option`` does not cover."""
    if not all(is_default(g) for g in groups):
        raise ValueError(f"second_moment/rotate ablations keep their state in the master dtype: {option} cannot be "
                         "combined with them")


def check_unchanged(group: dict[str, Any], built: Config) -> None:
    """The state layout was fixed at construction: changing the options afterwards is an error, not a no-op."""
    now = config(group)
    if now != built:
        raise ValueError(f"second_moment/rotate/rotation_seed changed from {built} to {now} after the optimizer was "
                         "built; they fix the state layout: build a new optimizer instead")


def check_same_config(mine: dict[str, Any], saved: dict[str, Any], gi: int) -> None:
    if config(mine) != config(saved):
        raise ValueError(f"param group {gi}: the state dict was saved with (second_moment, rotate, rotation_seed) = "
                         f"{config(saved)}, this optimizer has {config(mine)}; build it with the same options")


def rotation_matrices(rows: int, cols: int, rotation_seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q_L, Q_R) of parameter #``index`` (its position over all param groups), float64 on the CPU.

    A CPU ``torch.Generator`` seeded with ``rotation_seed * 1_000_003 + index`` draws a Gaussian
    rows x rows matrix, then a cols x cols one; each is replaced by the Q of its QR decomposition with
    columns multiplied by the signs of R's diagonal (which makes Q Haar-distributed).
    """
    gen = torch.Generator().manual_seed(rotation_seed * _SEED_STRIDE + index)
    out = []
    for n in (rows, cols):
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
        out.append(q * sign)
    return out[0], out[1]


@dataclass(frozen=True)
class Layout:
    """How one parameter's ablated state is shaped and updated."""

    shape: tuple[int, ...]  # the parameter's
    rows: int
    cols: int
    second_moment: str  # effective: "row"/"column" on a parameter with < 2 dims is "element"
    rotate: bool

    @property
    def v_matrix_shape(self) -> tuple[int, int]:
        return {"element": (self.rows, self.cols), "row": (self.rows, 1), "column": (1, self.cols),
                "tensor": (1, 1)}[self.second_moment]

    @property
    def saved_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes in ``state_dict()`` of the state this layout changes (other state keeps the param's shape)."""
        nd = len(self.shape)  # parameters with < 2 dims only ever have "tensor" layouts
        if self.second_moment == "element":
            v = self.shape
        elif self.second_moment == "row":
            v = (*self.shape[:-1], 1)
        elif self.second_moment == "column":
            v = (*(1,) * (nd - 1), self.cols)
        else:
            v = (1,) * nd
        shapes = {"exp_avg_sq": v}
        if self.rotate:
            shapes.update(rotation_left=(self.rows, self.rows), rotation_right=(self.cols, self.cols))
        return shapes

    def init_state(self, state: dict[str, Any], index: int, rotation_seed: int, dtype: torch.dtype,
                   device: torch.device) -> None:
        state["exp_avg_sq"] = torch.zeros(math.prod(self.v_matrix_shape), dtype=dtype, device=device)
        if self.rotate:
            q_left, q_right = rotation_matrices(self.rows, self.cols, rotation_seed, index)
            state["rotation_left"] = q_left.to(dtype=dtype, device=device)
            state["rotation_right"] = q_right.to(dtype=dtype, device=device)

    def update(self, rule: str, state: dict[str, Any], grad: torch.Tensor | None, t: float, group: dict[str, Any],
               lr: float) -> None:
        """One step of ``rule`` ("atan2" or "adamw") on this parameter's master weights (decay already applied)."""
        beta1, beta2 = group["betas"]
        p = state["master_param"].view(self.rows, self.cols)
        m = state["exp_avg"].view(self.rows, self.cols)
        v = state["exp_avg_sq"].view(self.v_matrix_shape)
        g = torch.zeros_like(p) if grad is None else grad.reshape(self.rows, self.cols)
        if self.rotate:
            q_left, q_right = state["rotation_left"], state["rotation_right"]
            g = q_left.T @ g @ q_right
        m.lerp_(g, 1.0 - beta1)
        g2 = g * g
        if self.second_moment == "row":
            g2 = g2.mean(dim=1, keepdim=True)
        elif self.second_moment == "column":
            g2 = g2.mean(dim=0, keepdim=True)
        elif self.second_moment == "tensor":
            g2 = g2.mean().reshape(1, 1)
        v.mul_(beta2).add_(g2, alpha=1.0 - beta2)
        c1, c2 = 1.0 - beta1**t, 1.0 - beta2**t
        if rule == "atan2":
            a, b = float(group.get("a", 1.0)), float(group.get("b", 1.0))
            inside = bool(group.get("bias_correction_in_atan2", False))
            upd = torch.atan2(m / c1 if inside else m, v.sqrt() * (b / math.sqrt(c2)))
            upd.mul_(a if inside else a / c1)
        elif rule == "adamw":
            upd = m / (v.sqrt() / math.sqrt(c2) + float(group["eps"])) / c1
        else:  # validate_group only lets the AdamATan2 and AdamW rules get here
            raise NotImplementedError(f"second_moment/rotate are not implemented for the {rule!r} rule")
        if self.rotate:
            upd = q_left @ upd @ q_right.T
        p.add_(upd, alpha=-lr)

    def export(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Copies of the state this layout changes, in their ``state_dict()`` shapes."""
        return {name: state[name].detach().clone().view(shape) for name, shape in self.saved_shapes.items()}

    def validate(self, entry: dict[str, Any], where: str) -> None:
        for name, shape in self.saved_shapes.items():
            if name not in entry:
                raise ValueError(f"state dict entry for {where} lacks '{name}'")
            if tuple(entry[name].shape) != shape:
                raise ValueError(f"state dict '{name}' for {where} has shape {tuple(entry[name].shape)}, "
                                 f"expected {shape}")

    def load(self, state: dict[str, Any], entry: dict[str, Any]) -> None:
        for name in self.saved_shapes:
            state[name].copy_(torch.as_tensor(entry[name]).reshape(state[name].shape))


def layout_of(param: torch.Tensor, group: dict[str, Any]) -> Layout | None:
    """The ablated layout of ``param`` in ``group``, or None when it takes the engine's usual path."""
    if "second_moment" not in group or is_default(group) or param.numel() == 0:
        return None
    mode, rotate = config(group)[:2]
    shape = tuple(param.shape)
    if len(shape) < 2:
        rotate = False
        mode = "tensor" if mode == "tensor" else "element"
        rows, cols = 1, param.numel()
    else:
        rows, cols = math.prod(shape[:-1]), shape[-1]
    if mode == "element" and not rotate:
        return None
    return Layout(shape, rows, cols, mode, rotate)
