"""Label-free correctors."""
from selfheal_core.correct.norm_stats import NormStatsAdapter

__all__ = ["NormStatsAdapter"]
