"""Container entrypoint: TorchServe in the foreground, stopped gracefully on SIGTERM.

As PID 1, a process ignores SIGTERM unless it handles it, and TorchServe's CLI
would leave Java behind if it died: this script runs the CLI in its own process
group, forwards SIGTERM/SIGINT to the whole group (Java's shutdown hook then
stops the Python workers) and exits 0 once every process of the group is gone.
"""
import os
import signal
import subprocess
import sys
import time

GRACE_S = 20  # wait this long for Java and the workers after SIGTERM (docker stop waits 10s by default: use -t 30)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def main() -> int:
    os.makedirs(os.environ.get("TEMP", "/tmp"), exist_ok=True)
    cmd = ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", "config.properties",
           "--model-store", "model-store"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    stopping = False

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = proc.wait()
    deadline = time.monotonic() + GRACE_S
    while group_alive(proc.pid) and time.monotonic() < deadline:
        try:
            os.waitpid(-1, os.WNOHANG)  # PID 1 reaps the orphans (Java, workers)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    return 0 if stopping else code


if __name__ == "__main__":
    sys.exit(main())
