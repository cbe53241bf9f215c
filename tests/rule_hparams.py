"""Hyperparameters per rule that the multi-process tests share: large enough steps that a wrong shard,
sum or decay shows, small enough for the SRF rules (which step by m/v) to stay finite."""

RULES = {
    "adams": dict(lr=2e-2, weight_decay=0.5, scalar_vector_weight_decay=0.3),
    "adamatan2": dict(lr=2e-2, weight_decay=0.1, a=1.27, b=1.5),
    "adamw": dict(lr=2e-2, weight_decay=0.1),
    "adamsrf": dict(lr=1e-3, eps=1e-3),
    "homeadam": dict(lr=1e-3, eps=1e-3, tau=0.5),
    "homeadamew": dict(lr=1e-3, eps=1e-3, tau=0.5),
}
