"""selfheal_core: keep a served PyTorch model accurate under drift (plain PyTorch, no server import)."""
from selfheal_core.config import CorrectConfig, GuardConfig, HealConfig, LearnConfig, MonitorConfig
from selfheal_core.healer import SelfHealer
from selfheal_core.learner import Learner
from selfheal_core.serving import Published, ServingModel
from selfheal_core.storage import FileSnapshotStore, SnapshotStore, open_storage
from selfheal_core.task import Task, TaskKind

__all__ = ["SelfHealer", "ServingModel", "Learner", "Published", "HealConfig", "MonitorConfig", "CorrectConfig",
           "LearnConfig", "GuardConfig", "SnapshotStore", "FileSnapshotStore", "open_storage", "Task", "TaskKind"]
__version__ = "0.2.0"
