"""A watchdog process that removes a throw-away server however its owner ends.

atexit does not run when a process is killed (SIGKILL, the OOM killer, a CI
timeout, ``os._exit``), so a server it started would run on and its directory
stay. A watchdog holds the read end of a pipe whose only write end is in the
owning process. The kernel closes that end however the process ends; the
watchdog then reads end-of-file, stops the server named in a pid file and
removes the directory. After a normal exit there is nothing left for it to do.

POSIX only: elsewhere :func:`start_watchdog` starts none. The watchdog runs
this file alone, with the standard library, so it starts in milliseconds and
never imports Django.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

#: Seconds each signal gets to stop the server before the next one is sent.
SIGNAL_TIMEOUT = 10.0

# This process's watchdogs. Our pipe ends are not inheritable, so exec'd children never
# hold them; forked ones would (multiprocessing, a parallel test runner) and keep the
# servers alive after us, so they close them as they start.
_watchdogs: list[Watchdog] = []


class Watchdog:
    """This process's end of a watchdog's pipe; ``pid`` is the watchdog's."""

    def __init__(self, write_end: int) -> None:
        self.pid: int | None = None
        self._write_end = write_end
        _watchdogs.append(self)

    def close(self) -> None:
        """Close our end now: the watchdog cleans up and exits.

        Called once the server is stopped and removed, so that the watchdog finds
        nothing to do.
        """
        if self._write_end >= 0:
            os.close(self._write_end)
            self._write_end = -1
        if self in _watchdogs:
            _watchdogs.remove(self)


def _close_in_forked_child() -> None:
    for watchdog in list(_watchdogs):
        watchdog.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_forked_child)


def start_watchdog(
    directory: Path, pidfile: Path, signals: Sequence[signal.Signals]
) -> Watchdog | None:
    """Start a watchdog that removes ``directory`` once this process has ended.

    Args:
        directory: Removed with everything in it.
        pidfile: Its first line is the pid of the server to stop first. It is read
            when this process has ended, so a server restarted meanwhile is the one
            stopped.
        signals: Sent in turn, :data:`SIGNAL_TIMEOUT` seconds apart, until the server
            is gone or ``pidfile`` no longer names it.

    Returns:
        The watchdog, or None where processes cannot be watched this way (not POSIX).

    Raises:
        RuntimeError: The watchdog did not start.
    """
    if os.name != "posix":
        return None
    read_end, write_end = os.pipe()
    watchdog = Watchdog(write_end)  # before anything can fork
    command = [
        sys.executable,
        "-I",  # by path, isolated: neither this package nor the caller's environment
        os.path.abspath(__file__),
        str(read_end),
        os.path.abspath(directory),
        os.path.abspath(pidfile),
        *(sig.name for sig in signals),
    ]
    try:
        # Its own session: a Ctrl-C or a kill of our process group must not end the
        # watchdog before it has cleaned up after us.
        launched = subprocess.run(
            command,
            pass_fds=(read_end,),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if launched.returncode != 0:
            raise RuntimeError(f"the watchdog did not start: {launched.stderr.strip()}")
        watchdog.pid = int(launched.stdout.split()[-1])
    except BaseException:
        watchdog.close()
        raise
    finally:
        os.close(read_end)
    return watchdog


def _stop_process(
    pidfile: Path, signals: Sequence[signal.Signals], timeout: float = SIGNAL_TIMEOUT
) -> None:
    """Stop the process ``pidfile`` names, if it runs, sending ``signals`` in turn.

    Each signal gets ``timeout`` seconds; the process counts as stopped once it is
    gone or ``pidfile`` no longer names it (servers remove theirs as they exit).
    """
    pid = _pid_in(pidfile)
    if pid is None:
        return
    for sig in signals:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):  # gone (the pid may be another's now)
            return
        if _stopped_within(timeout, pidfile, pid):
            return


def _stopped_within(timeout: float, pidfile: Path, pid: int) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_in(pidfile) == pid and _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _pid_in(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # A zombie has ended; only its parent's wait is missing.
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _watch(read_end: int, directory: str, pidfile: str, signals: list[signal.Signals]) -> None:
    """The watchdog's life: wait for end-of-file, stop the server, remove the directory."""
    while os.read(read_end, 512):
        pass
    _stop_process(Path(pidfile), signals)
    shutil.rmtree(directory, ignore_errors=True)


def _main(argv: list[str]) -> None:
    read_end, directory, pidfile, *names = argv
    fd, signals = int(read_end), [signal.Signals[name] for name in names]
    child = os.fork()
    if child:
        # The launcher: say who the watchdog is and leave it to run on, detached.
        print(child, flush=True)
        os._exit(0)
    # Neither the caller's output pipes (whoever reads them waits for their end) nor
    # its working directory are held.
    devnull = os.open(os.devnull, os.O_RDWR)
    for standard in (0, 1, 2):
        os.dup2(devnull, standard)
    os.close(devnull)
    os.chdir("/")
    _watch(fd, directory, pidfile, signals)


if __name__ == "__main__":
    _main(sys.argv[1:])
