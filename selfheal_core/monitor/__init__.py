"""Drift monitor: calibrated online detectors (one file each) and the Monitor that combines them."""
from selfheal_core.monitor.base import CusumDetector, Detector, MewmaDetector, RankCusumDetector, calibrate_threshold
from selfheal_core.monitor.class_shift import ClassShiftDetector
from selfheal_core.monitor.confidence import ConfidenceDetector, normalized_entropy
from selfheal_core.monitor.error_rate import ErrorRateDetector
from selfheal_core.monitor.feature_shift import FeatureShiftDetector
from selfheal_core.monitor.monitor import (INPUT_SHIFT, LABEL_FREE, ON_FEEDBACK, DetectorName, DriftState, Monitor,
                                           ReferenceView, merge_drift)
from selfheal_core.monitor.residual import ResidualDetector

__all__ = ["Monitor", "DriftState", "DetectorName", "ReferenceView", "LABEL_FREE", "ON_FEEDBACK", "INPUT_SHIFT",
           "Detector", "CusumDetector", "RankCusumDetector", "MewmaDetector", "ConfidenceDetector",
           "FeatureShiftDetector", "ClassShiftDetector", "ErrorRateDetector", "ResidualDetector",
           "calibrate_threshold", "normalized_entropy", "merge_drift"]
