"""A throwaway PostgreSQL server on loopback, for tests and benchmarks (Debian's postgresql package).

initdb into a fresh directory, `postgres` on a free port with trust
authentication for loopback only, stopped (fast shutdown) and removed on
exit. PostgreSQL refuses to run as root, so as root the server runs as the
`postgres` system user the Debian package creates.
"""
from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from selfheal_bench.ports import free_port

log = logging.getLogger(__name__)


def find_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or in Debian's versioned directory (not on PATH there)."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return versions[-1] if versions else None


def available() -> str | None:
    """None if a server can be started here, else why not."""
    if not (find_bin("initdb") and find_bin("pg_ctl")):
        return "PostgreSQL server programs (initdb, pg_ctl) not found: apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


class PostgresServer:
    """`with PostgresServer() as pg: pg.url` -> postgresql://selfheal@127.0.0.1:PORT/postgres"""

    def __init__(self, fsync: bool = True) -> None:
        self.fsync = fsync
        self.port = free_port()
        self.url = f"postgresql://selfheal@127.0.0.1:{self.port}/postgres"
        self.base = Path(tempfile.mkdtemp(prefix="selfheal-pg-"))
        self.data = self.base / "data"

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout.decode()[-2000:]}")

    def start(self) -> "PostgresServer":
        why = available()
        if why:
            raise RuntimeError(why)
        if os.geteuid() == 0:
            self.base.chmod(0o755)
            shutil.chown(self.base, "postgres", "postgres")
        self._run(find_bin("initdb"), "-D", str(self.data), "-U", "selfheal", "-A", "trust", "--no-sync",
                  "-E", "UTF8", "--locale=C")
        self._pg_ctl_start()
        log.info("PostgreSQL on 127.0.0.1:%d (data in %s)", self.port, self.data)
        return self

    def _pg_ctl_start(self) -> None:
        # -l: the server's output goes to a file, not to our pipe (which would then never close)
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.base} "
                   f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200")
        self._run(find_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.base / "server.log"), "-w", "-t", "60",
                  "-o", options, "start")

    def restart(self) -> None:
        """Fast shutdown (clients' connections break) and start again on the same port."""
        self._run(find_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        self._pg_ctl_start()

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(find_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # a server for trying things by hand: prints its URL, stops on Ctrl-C
    logging.basicConfig(level=logging.INFO)
    with PostgresServer() as pg:
        print(pg.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
