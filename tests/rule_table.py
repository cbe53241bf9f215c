"""One row per update rule: its optimizer class, defaults, named hyperparameter sets and float64 formula.

Parametrized tests read this table instead of keeping their own lists of classes and hyperparameters:

    @pytest.mark.parametrize("rule", TABLE, ids=str)
    def test_x(rule):
        opt = rule.cls(params, **rule.hp["dist"])

The defaults and formulas are the float64 reference's (tests/reference64.py), written from the docs and
not from the package; test_validation checks that every class really has these defaults.

Named hyperparameter sets (a rule has the sets that make sense for it):

    dist       the multi-process tests: steps large enough that a wrong shard, sum or decay shows, small
               enough for the SRF rules (which step by m/v) to stay finite
    group_a/b  two param groups that differ in every value (test_rules_reference); the HomeAdam rules'
               tau sits between the v_hat of its gradients (4 and 0.0025), so both branches run
    no_decay   every decay 0 (elements with zero gradients must then never move)
    kernel     the compiled / streamed kernels against the foreach ops
    decay      strong decay, for tests of decay fused into sharded or compiled updates
    gpt        the tiny FSDP2 GPT (lr small enough for 20 steps of a real model)
    ablation   the second_moment / rotate ablations (atan2 rules and AdamW only)
    pytorch    adamatan2 as adam-atan2-pytorch configures it (a = 1.27, bias correction inside atan2)
    sign       adamatan2 with b = 0: sign descent
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import adams_dist

try:
    from tests.reference64 import DEFAULTS, FORMULAS, Formula
except ImportError:  # tests/ is not a package: conftest put tests/ itself on sys.path
    from reference64 import DEFAULTS, FORMULAS, Formula


@dataclass(frozen=True)
class Rule:
    name: str                      # create_optimizer's and the reference's name
    cls: type                      # the public class
    hp: dict[str, dict[str, Any]] = field(default_factory=dict)  # named hyperparameter sets

    @property
    def defaults(self) -> dict[str, Any]:
        return DEFAULTS[self.name]

    @property
    def formula(self) -> Formula:
        return FORMULAS[self.name]

    @property
    def class_name(self) -> str:
        return self.cls.__name__

    def __str__(self) -> str:  # pytest ids
        return self.name


_KERNEL_EW = dict(lr=1e-3, eps=1e-4, tau=0.5, weight_decay=0.1)  # tau between the smallest and largest v_hat

ADAMS = Rule("adams", adams_dist.Adams_ZeRO, {
    "dist": dict(lr=2e-2, weight_decay=0.5, scalar_vector_weight_decay=0.3),
    "group_a": dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, scalar_vector_weight_decay=0.2),
    "group_b": dict(lr=3e-2, betas=(0.8, 0.99), weight_decay=0.5, scalar_vector_weight_decay=0.05),
    "no_decay": dict(weight_decay=0.0, scalar_vector_weight_decay=0.0),
    "kernel": dict(lr=1e-2, weight_decay=0.3),
    "decay": dict(lr=1e-2, weight_decay=0.5, scalar_vector_weight_decay=0.3),
    "gpt": dict(lr=3e-3, weight_decay=0.5),
})
ADAMATAN2 = Rule("adamatan2", adams_dist.AdamATan2, {
    "dist": dict(lr=2e-2, weight_decay=0.1, a=1.27, b=1.5),
    "group_a": dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1, a=1.0, b=1.0),
    "group_b": dict(lr=2e-2, betas=(0.8, 0.99), weight_decay=0.0, a=1.27, b=2.0),
    "no_decay": dict(weight_decay=0.0),
    "kernel": dict(lr=1e-2, a=1.27, b=2.0, bias_correction_in_atan2=True),
    "ablation": dict(lr=2e-2, betas=(0.9, 0.99), weight_decay=0.1),
    "pytorch": dict(lr=2e-2, betas=(0.9, 0.99), weight_decay=0.1, a=1.27, b=0.5, bias_correction_in_atan2=True),
    "sign": dict(lr=1e-2, b=0.0),
})
ADAMW = Rule("adamw", adams_dist.AdamW, {
    "dist": dict(lr=2e-2, weight_decay=0.1),
    "group_a": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
    "group_b": dict(lr=2e-2, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.2),
    "no_decay": dict(weight_decay=0.0),
    "kernel": dict(lr=1e-2, eps=1e-6),
    "decay": dict(lr=1e-2, weight_decay=0.3),
    "gpt": dict(lr=3e-3),
    "ablation": dict(lr=2e-2, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-8),
})
ADAMSRF = Rule("adamsrf", adams_dist.AdamSRF, {
    "dist": dict(lr=1e-3, eps=1e-3),
    "group_a": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    "group_b": dict(lr=2e-3, betas=(0.8, 0.99), eps=1e-2, weight_decay=0.1),
    "no_decay": dict(weight_decay=0.0),
    "kernel": dict(lr=1e-3, eps=1e-4, weight_decay=0.1),
})
HOMEADAM = Rule("homeadam", adams_dist.HomeAdam, {
    "dist": dict(lr=1e-3, eps=1e-3, tau=0.5),
    "group_a": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, tau=1e-2, weight_decay=0.0),
    "group_b": dict(lr=2e-3, betas=(0.8, 0.99), eps=1e-6, tau=1e-3, weight_decay=0.1),
    "no_decay": dict(weight_decay=0.0, tau=1e-3),
})
HOMEADAMEW = Rule("homeadamew", adams_dist.HomeAdamEW, {
    "dist": dict(lr=1e-3, eps=1e-3, tau=0.5),
    "group_a": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, tau=1e-2, weight_decay=0.0),
    "group_b": dict(lr=2e-3, betas=(0.8, 0.99), eps=1e-6, tau=0.5, weight_decay=0.1),
    "no_decay": dict(weight_decay=0.0, tau=1e-3),
    "kernel": _KERNEL_EW,
    "decay": _KERNEL_EW,
})

TABLE: tuple[Rule, ...] = (ADAMS, ADAMATAN2, ADAMW, ADAMSRF, HOMEADAM, HOMEADAMEW)
BY_NAME: dict[str, Rule] = {r.name: r for r in TABLE}
BY_CLASS: dict[str, Rule] = {r.class_name: r for r in TABLE}
assert set(BY_NAME) == set(DEFAULTS), "every rule of the reference has a row, and only those"


def with_set(name: str) -> list[Rule]:
    """The rules that have the hyperparameter set ``name``, in table order."""
    return [r for r in TABLE if name in r.hp]


def hp_of(name: str, rules: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{rule name: hyperparameters}`` for set ``name`` (all rules that have it, or those listed)."""
    chosen = with_set(name) if rules is None else [BY_NAME[r] for r in rules]
    return {r.name: r.hp[name] for r in chosen}
