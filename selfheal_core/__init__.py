"""selfheal_core: keep a served PyTorch classifier accurate under drift (no TorchServe import)."""
from selfheal_core.config import CorrectConfig, GuardConfig, HealConfig, LearnConfig, MonitorConfig
from selfheal_core.healer import SelfHealer
from selfheal_core.store import SnapshotStore

__all__ = ["SelfHealer", "HealConfig", "MonitorConfig", "CorrectConfig", "LearnConfig", "GuardConfig",
           "SnapshotStore"]
__version__ = "0.1.0"
