"""Keeping one learner process per TorchServe instance and model.

Among the workers of a model, the one holding `<workdir>/selfheal/<model>.supervisor.lock`
starts the learner process and restarts it when it dies (with a back-off, so
a learner that cannot start does not spin). The learner announces itself in
`<workdir>/selfheal/<model>.json` (its pid, port and a random secret, 0600):
the feedback plugin reads it to forward feedback, and a worker that takes
over supervision after another died finds the learner that worker started
still running. The learner stays in TorchServe's process group and exits when
the frontend does.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from selfheal_core.storage import FileLease
from selfheal_serving.settings import HandlerSettings

log = logging.getLogger(__name__)

BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def control_dir(workdir: Path) -> Path:
    path = workdir / "selfheal"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def announcement(workdir: Path, model: str) -> Path:
    return control_dir(workdir) / f"{model}.json"


def read_announcement(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Whether `pid` is a running learner process (not a zombie, not a reused pid)."""
    try:
        proc = psutil.Process(pid)
        return (proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
                and "selfheal_torchserve.learner_service" in " ".join(proc.cmdline()))
    except psutil.Error:
        return False


class LearnerSupervisor:
    def __init__(self, workdir: Path, model_name: str, context, handler_cls: type, settings: HandlerSettings) -> None:
        self.workdir = workdir
        self.model_name = model_name
        self.model_dir = context.system_properties["model_dir"]
        self.handler = f"{handler_cls.__module__}:{handler_cls.__qualname__}"
        self.settings = settings
        self.lock = FileLease(control_dir(workdir), f"{model_name}.supervisor")
        self.file = announcement(workdir, model_name)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._next_start = 0.0
        self._started_at = 0.0

    @property
    def supervising(self) -> bool:
        return self.lock.held

    def running_pid(self) -> int | None:
        """The pid of this instance's learner process, if one runs."""
        if self.proc is not None and self.proc.poll() is None:
            return self.proc.pid
        info = read_announcement(self.file)
        if info and alive(int(info.get("pid", -1))):
            return int(info["pid"])
        return None

    def tick(self) -> None:
        """Start the learner if this worker supervises and none runs."""
        if not self.lock.try_acquire():
            return
        if self.running_pid() is not None:
            return
        if self.proc is not None:  # ours died
            code = self.proc.poll()
            log.warning("selfheal learner for %s exited with %s; restarting", self.model_name, code)
            quick = time.monotonic() - self._started_at < 30
            self._next_start = time.monotonic() + (BACKOFF_S[min(self.starts - 1, len(BACKOFF_S) - 1)] if quick else 0)
            self.proc = None
        if time.monotonic() < self._next_start:
            return
        self._start()

    def _start(self) -> None:
        cmd = [sys.executable, "-m", "selfheal_torchserve.learner_service", "--model-dir", str(self.model_dir),
               "--handler", self.handler, "--model-name", self.model_name, "--workdir", str(self.workdir),
               "--frontend-pid", str(os.getppid()), "--threads", str(self.settings.learner_threads),
               "--nice", str(self.settings.learner_nice)]
        if self.settings.learner == "external":
            cmd.append("--intake-only")
        logs = Path(os.environ.get("LOG_LOCATION") or self.workdir / "logs")
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"selfheal_learner_{self.model_name}.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        finally:
            out.close()
        self.starts += 1
        self._started_at = time.monotonic()
        log.info("started the selfheal learner for %s (pid %d)", self.model_name, self.proc.pid)

    def wait_ready(self, timeout: float) -> bool:
        """Until the learner announced its port (feedback works); False after `timeout`."""
        if not self.supervising:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = read_announcement(self.file)
            if info and alive(int(info.get("pid", -1))):
                return True
            if self.proc is not None and self.proc.poll() is not None:
                log.error("selfheal learner for %s exited with %s during start-up (see "
                          "selfheal_learner_%s.log)", self.model_name, self.proc.returncode, self.model_name)
                return False
            time.sleep(0.1)
        log.error("selfheal learner for %s not ready after %.0f s; feedback answers 503 until it is",
                  self.model_name, timeout)
        return False

    def close(self) -> None:
        self.lock.release()
