"""Learning from labelled feedback."""
from selfheal_core.learn.gradient import GradientLearner, select_parameters
from selfheal_core.learn.replay import ReplayBuffer

__all__ = ["GradientLearner", "ReplayBuffer", "select_parameters"]
