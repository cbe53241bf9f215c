"""Update rules: each element-wise rule is one function, registered by name.

A new element-wise rule is one function and one ``register`` call (docs/extending.md has a complete
Lion optimizer)::

    def lion_rule(lr, betas):
        beta1, beta2 = betas

        def update(g, exp_avg):
            direction = torch.sign(exp_avg.lerp(g, 1 - beta1))
            exp_avg.lerp_(g, 1 - beta2)
            return direction * -lr

        return update

    rules.register(rules.ElementwiseRule("lion", lion_rule, state_names=("exp_avg",)))

The rule function takes this step's scalars by name (``lr``, ``step`` if it wants it, and
hyperparameters read from the param group; those with a default may be absent), does its scalar
math in Python, and returns ``update(g, *state)``: one tensor's update, changing the state in place
and returning the step to add to the parameter (decoupled weight decay is the engine's). The compiled
kernel, the chunked eager path for large tensors and the batched path for small ones are all derived
from it (rules/elementwise.py). Inside ``update``, use ``rules.atan2`` for atan2 (the polynomial when
compiled). ``rules.get(name)`` then gives the rule to a ``ShardedOptimizer`` subclass.
"""

from __future__ import annotations

from ..decay import NO_DECAY, Decay
from .atan2 import atan2
from .base import KERNELS, ReduceMin, Rule, Tensors, adam_moments
from .compiled import COMPILED_MIN_NUMEL, compile_supported
from .elementwise import ElementwiseRule
from .library import ADAMW, ATAN2, HOMEADAM, HOMEADAMEW, SRF, HomeAdamRule

__all__ = ["COMPILED_MIN_NUMEL", "KERNELS", "NO_DECAY", "Decay", "ElementwiseRule", "HomeAdamRule", "ReduceMin",
           "Rule", "Tensors", "adam_moments", "atan2", "compile_supported", "get", "names", "register"]

BUILTIN = {r.name: r for r in (ATAN2, ADAMW, SRF, HOMEADAM, HOMEADAMEW)}
_registry: dict[str, Rule] = dict(BUILTIN)


def register(rule: Rule) -> Rule:
    """Make ``rule`` known as ``rule.name`` and return it. Registering a name again replaces the earlier
    rule (re-running a notebook cell works); the built-in names cannot be taken."""
    if not rule.name or not isinstance(rule.name, str):
        raise ValueError(f"a rule needs a name, got {rule.name!r}")
    if rule.name in BUILTIN and BUILTIN[rule.name] is not rule:
        raise ValueError(f"{rule.name!r} is a built-in rule; register yours under another name")
    _registry[rule.name] = rule
    return rule


def get(name: str) -> Rule:
    """The rule registered as ``name``."""
    if name not in _registry:
        raise KeyError(f"no rule named {name!r}; registered: {', '.join(_registry)}")
    return _registry[name]


def names() -> tuple[str, ...]:
    return tuple(_registry)
