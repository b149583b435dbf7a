"""Learning from labelled feedback: gradient steps with replay, and a Bayesian last layer."""
from selfheal_core.learn.bayes import BayesianLastLayer
from selfheal_core.learn.gradient import GradientLearner, select_parameters
from selfheal_core.learn.replay import ReplayBuffer

__all__ = ["GradientLearner", "ReplayBuffer", "BayesianLastLayer", "select_parameters"]
