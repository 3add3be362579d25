"""FedSVD and its baselines: pure-torch aggregation math (``aggregation``) and thin Flower strategies
(``flower``, imported on demand so the math is usable without Flower)."""

from .aggregation import (
    RULES,
    AggregationRule,
    aggregate,
    apply_mean_update,
    client_update,
    get_rule,
    trained_keys,
    weighted_mean,
)

__all__ = ["RULES", "AggregationRule", "aggregate", "apply_mean_update", "client_update", "get_rule", "trained_keys",
           "weighted_mean"]
