"""The runner's notebook kernel: ipykernel in a child process, watched, so that the runner can say how a kernel
ended (papermill only reports "the kernel died").

``python -m tokenbook.kernel_launcher -f <connection file>`` starts ``python -m ipykernel_launcher -f ...`` in the
same process group, forwards the signals a kernel manager sends (interrupt, terminate, hang-up, quit, user
signals), ends the kernel when the kernel manager itself dies, and when the kernel ends writes ``{"returncode": rc, "signal": "SIGKILL" | null}`` to the file named by
``$TOKENBOOK_KERNEL_STATUS`` (atomically), then exits with the kernel's status (128 + signal number for a signal).
The runner's kernelspec (``tokenbook-python3``) points here; nothing changes inside the kernel.

When the kernel has ended, whatever it left behind in the launcher's process group is ended too
(:func:`end_group`): the training processes a notebook spawned (``tokenbook.runs.launch(executor="processes")``,
DataLoader workers) would otherwise go on training, orphaned, after the runner's time limit ended the notebook,
and take the cores from the next notebook. (jupyter_client starts every kernel in a new session, so the group is
the kernel's own.)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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


def _group_members(pgid: int) -> list[int]:
    """The other live processes of process group ``pgid`` (Linux: read from /proc; elsewhere none are known)."""
    me, out = os.getpid(), []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            out.append(int(name))
    return out


def end_group(grace_s: float = 5.0) -> list[int]:
    """End every other process of this process's group, when this process leads the group: SIGTERM, then SIGKILL
    after ``grace_s`` for what is left. Returns the pids that were still there. A process that does not lead its
    group (run by hand from a shell) leaves the group alone: it is not the kernel's."""
    if not hasattr(os, "killpg") or os.getpgrp() != os.getpid():
        return []
    pgid = os.getpgrp()
    left = _group_members(pgid)
    if not left:
        return []
    for pid in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_members(pgid):
        time.sleep(0.1)
    for pid in _group_members(pgid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


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
    end_group()  # the kernel's orphans: training processes it spawned must not outlive it
    status = os.environ.get("TOKENBOOK_KERNEL_STATUS")
    if status:
        try:
            _write_status(status, rc)
        except OSError:
            pass
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main())
