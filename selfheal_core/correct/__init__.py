"""Label-free correction: one corrector per file, one protocol (correct/base.py), one orchestrator."""
from selfheal_core.correct.affine import AffineNormAdapter
from selfheal_core.correct.base import Corrector, Observation
from selfheal_core.correct.corrector import NOTHING_TO_ADAPT, LabelFreeCorrector
from selfheal_core.correct.entropy import EntropyAdapter, FeatureAdapter, reliable_entropy
from selfheal_core.correct.input_stats import InputStatsAdapter
from selfheal_core.correct.norm_stats import NormStatsAdapter
from selfheal_core.correct.prior import PriorCorrector

__all__ = ["LabelFreeCorrector", "Corrector", "Observation", "NormStatsAdapter", "AffineNormAdapter",
           "EntropyAdapter", "FeatureAdapter", "InputStatsAdapter", "PriorCorrector", "reliable_entropy", "NOTHING_TO_ADAPT"]
