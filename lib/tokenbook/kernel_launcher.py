"""The runner's notebook kernel: ipykernel in a child process, watched, so that the runner can say how a kernel
ended (papermill only reports "the kernel died").

``python -m tokenbook.kernel_launcher -f <connection file>`` starts ``python -m ipykernel_launcher -f ...`` in the
same process group, forwards the signals a kernel manager sends (interrupt, terminate, hang-up, quit, user
signals), ends the kernel when the kernel manager itself dies, and when the kernel ends writes ``{"returncode": rc, "signal": "SIGKILL" | null}`` to the file named by
``$TOKENBOOK_KERNEL_STATUS`` (atomically), then exits with the kernel's status (128 + signal number for a signal).
The runner's kernelspec (``tokenbook-python3``) points here; nothing changes inside the kernel.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _write_status(path: str, rc: int) -> None:
    sig = signal.Signals(-rc).name if rc < 0 and -rc in signal.Signals._value2member_map_ else None
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"returncode": rc, "signal": sig, "pid": os.getpid()}, f)
    os.replace(tmp, path)


def _wait(child: subprocess.Popen, parent: int, poll_s: float = 1.0) -> int:
    """Wait for the kernel; if our parent (the kernel manager, e.g. papermill) dies first, end the kernel.

    ipykernel watches its own parent process, which is this launcher, so without this a kernel would outlive a
    killed papermill (as after the runner's time limit)."""
    while True:
        try:
            return child.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                child.terminate()
                try:
                    return child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    child.kill()
                    return child.wait()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return run([sys.executable, "-m", "ipykernel_launcher", *args])


def run(cmd: list[str]) -> int:
    """Run ``cmd`` as the watched child (the kernel); returns the exit status to exit with."""
    parent = os.getppid()
    child = subprocess.Popen(cmd)
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    rc = _wait(child, parent)
    status = os.environ.get("TOKENBOOK_KERNEL_STATUS")
    if status:
        try:
            _write_status(status, rc)
        except OSError:
            pass
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main())
