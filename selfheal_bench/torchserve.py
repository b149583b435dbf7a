"""Start, talk to and stop one real TorchServe on loopback, isolated from any other.

Each server gets its own working directory (logs, key_file.json), its own
TMPDIR (TorchServe's CLI keeps one PID file there and `--stop` kills whatever
it names), its own five ports, and its own process group: `stop()` ends only
the processes this object started.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from selfheal_bench.ports import free_ports

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "build" / "plugins"  # selfheal-feedback.jar, built by `make setup` (plugins/build.sh)
# JVM flags for the frontends this harness starts (TorchServe's `vmargs`), when set: the test suite
# sets a quick-starting JVM (tests/conftest.py); benchmarks and deployments leave the JVM as it ships.
VMARGS_ENV = "SELFHEAL_TS_VMARGS"


def build_archive(model_dir: Path, export_dir: Path, name: str = "digits",
                  config_file: Path = REPO / "model-config.yaml", handler: str = "selfheal_torchserve.handler",
                  model_file: Path | None = REPO / "selfheal_bench" / "models.py", weights: str = "digits_cnn.pt",
                  extra: list[str] | None = None) -> Path:
    """`selfheal archive` on a trained model directory (weights + reference.pt); returns the .mar path."""
    export_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("selfheal")), "archive", "--name", name,
           "--weights", str(model_dir / weights), "--reference", str(model_dir / "reference.pt"),
           "--config", str(config_file), "--handler", str(handler), "--export-path", str(export_dir)]
    if model_file is not None:
        cmd += ["--model-file", str(model_file)]
    run = subprocess.run(cmd + list(extra or []), capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"selfheal archive failed ({run.returncode}): {run.stderr[-3000:]}")
    return export_dir / f"{name}.mar"


class TorchServe:
    """One TorchServe process tree; use as a context manager."""

    def __init__(self, workdir: Path, model_store: Path, models: str = "digits.mar",
                 env: dict[str, str] | None = None, ports: list[int] | None = None,
                 extra_config: dict[str, str] | None = None, token_auth: bool = True) -> None:
        self.workdir = Path(workdir)
        self.model_store = Path(model_store)
        self.models = models
        self.env = dict(env or {})
        self.ports = ports or free_ports(5)
        self._own_ports = ports is None  # ports we drew may be drawn again if another process took one
        self.extra_config = dict(extra_config or {})
        self.token_auth = token_auth
        self.proc: subprocess.Popen | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[1]}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[2]}"

    def _write_config(self) -> Path:
        """The repo's config.properties with this server's ports and model store."""
        lines = []
        for line in (REPO / "config.properties").read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            if key in {"inference_address", "management_address", "metrics_address", "grpc_inference_port",
                       "grpc_management_port", "model_store", "load_models", "plugins_path",
                       "metrics_config"} | set(self.extra_config):
                continue
            lines.append(line)
        p = self.ports
        lines += [f"inference_address=http://127.0.0.1:{p[0]}", f"management_address=http://127.0.0.1:{p[1]}",
                  f"metrics_address=http://127.0.0.1:{p[2]}", f"grpc_inference_port={p[3]}",
                  f"grpc_management_port={p[4]}", f"model_store={self.model_store}", f"load_models={self.models}",
                  f"plugins_path={PLUGINS}", f"metrics_config={REPO / 'selfheal_torchserve' / 'metrics.yaml'}"]
        lines += [f"{k}={v}" for k, v in self.extra_config.items()]
        vmargs = os.environ.get(VMARGS_ENV)
        if vmargs and "vmargs" not in self.extra_config:
            lines.append(f"vmargs={vmargs}")
        path = self.workdir / "config.properties"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 120.0) -> "TorchServe":
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp),  # TEMP: java.io.tmpdir, worker sockets
               "LOG_LOCATION": str(self.workdir / "logs"),
               "METRICS_LOCATION": str(self.workdir / "logs"), **self.env}
        cmd = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs",
               "--ts-config", str(self._write_config()), "--model-store", str(self.model_store)]
        if not self.token_auth:
            cmd.append("--disable-token-auth")
        out = self.workdir / "torchserve.out"
        for attempt in range(3):
            seen = out.stat().st_size if out.exists() else 0
            self._log = open(out, "ab")
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            try:
                self.wait_ready(timeout)
                return self
            except BaseException as exc:  # a server that did not come up is still running: end it first
                self.stop()
                if not (attempt < 2 and isinstance(exc, RuntimeError) and self._own_ports
                        and self._lost_a_port(out, seen)):
                    raise
            log.warning("TorchServe in %s lost a port to another process; starting it on new ports", self.workdir)
            self.ports = free_ports(5)
            cmd[cmd.index("--ts-config") + 1] = str(self._write_config())
        return self  # not reached: the last attempt returns or raises

    @staticmethod
    def _lost_a_port(out: Path, seen: int) -> bool:
        """Whether the server's output since byte `seen` says another process held one of its ports."""
        with open(out, "rb") as f:
            f.seek(seen)
            return b"Address already in use" in f.read()

    def wait_ready(self, timeout: float, workers: int = 1) -> None:
        """Until the model has `workers` READY workers; raises with the log tail on failure."""
        deadline = time.monotonic() + timeout
        name = self.models.split("=")[0].removesuffix(".mar")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = requests.get(f"{self.management_url}/models/{name}", headers=self.headers("management"),
                                 timeout=2)
                if r.ok and sum(w.get("status") == "READY" for w in r.json()[0].get("workers", [])) >= workers:
                    return
            except (requests.RequestException, FileNotFoundError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe not ready after {timeout}s:\n{self.log_tail()}")

    def keys(self) -> dict[str, str]:
        """Tokens from key_file.json ({"management", "inference", "API"}); empty without token auth."""
        if not self.token_auth:
            return {}
        data = json.loads((self.workdir / "key_file.json").read_text())
        return {k: v["key"] for k, v in data.items()}

    def feedback(self, model: str, body=None, raw: bytes | None = None, key: str | None = "management",
                 method: str = "post") -> requests.Response:
        """POST (or GET) /feedback/{model} on the management port, with the management key by default."""
        headers = self.headers(key) if key else {}
        url = f"{self.management_url}/feedback/{model}"
        if raw is not None:
            return requests.request(method, url, data=raw, headers=headers, timeout=60)
        return requests.request(method, url, json=body, headers=headers, timeout=60)

    def headers(self, api: str = "inference") -> dict[str, str]:
        keys = self.keys()
        return {"Authorization": f"Bearer {keys[api]}"} if keys else {}

    def log_tail(self, n: int = 60) -> str:
        lines: list[str] = []
        for path in (self.workdir / "torchserve.out", self.workdir / "logs" / "model_log.log"):
            if path.exists():
                lines += [f"--- {path.name}"] + path.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)

    def worker_pids(self) -> list[int]:
        """PIDs of this server's Python workers (children of its Java frontend)."""
        import psutil

        if self.proc is None:
            return []
        pids = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "model_service_worker" in " ".join(child.cmdline()):
                    pids.append(child.pid)
            except psutil.Error:  # exited (or a zombie) while we looked
                pass
        return pids

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate this server's process group (and nothing else)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        try:  # Java may leave workers behind in the group; end them too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        self.proc = None

    def __enter__(self) -> "TorchServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
