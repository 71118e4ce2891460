"""A watchdog process that removes a throw-away server however its owner ends.

atexit does not run when a process is killed (SIGKILL, the OOM killer, a CI
timeout, ``os._exit``), so a server it started would run on and its directory
stay. A watchdog holds the read end of a pipe whose only write end is in the
owning process. The kernel closes that end however the process ends; the
watchdog then reads end-of-file, stops the server named in a pid file and
removes the directory. After a normal exit there is nothing left for it to do.

The server lives as long as the process that started it, not as long as its
pid: the write end is close-on-exec, so an owner that calls ``exec()`` ends the
server as surely as one that exits.

A pid file is a claim, not a proof: it may be stale (the server crashed and its
pid went to another process) or hold what is no process at all (``0``, ``-1``,
a negated pid that signals a process group; PostgreSQL's standalone backend
writes one during initdb). So only a pid above 1 is signalled, and only while
that process's working directory is the server's (a postmaster works in its
data directory, a redis-server in its ``--dir``). On Linux the working directory
is read from ``/proc``, and the signal goes through a pidfd opened before the
check, so a pid reused between check and signal is not hit. Without ``/proc``
(macOS, the BSDs) it is asked of ``lsof``, and the signal goes by pid, as on a
Linux before 5.3: a server that ends right after the check, its pid taken at
once by another process, leaves that process to receive the signal. Where the
working directory cannot be read at all (no ``lsof``, another user's process),
nothing is signalled and the directory is only removed: a postmaster notices
that within a minute and exits, a redis-server runs on until stopped by hand.

POSIX only: elsewhere :func:`start_watchdog` starts none, and where it cannot
start one (``sys.executable`` is no Python, as under some application servers)
it warns and the server runs without. The watchdog runs this file alone, with
the standard library, so it starts in milliseconds and never imports Django.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

#: Seconds each signal gets to stop the server before the next one is sent.
SIGNAL_TIMEOUT = 10.0

# Linux: a process's working directory is a link in /proc.
_HAS_PROC = os.path.isdir("/proc/self")

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
    directory: Path,
    pidfile: Path,
    signals: Sequence[signal.Signals],
    *,
    server_cwd: Path,
) -> Watchdog | None:
    """Start a watchdog that removes ``directory`` once this process has ended.

    Args:
        directory: Removed with everything in it.
        pidfile: Its first line is the pid of the server to stop first. It is read
            when this process has ended, so a server restarted meanwhile is the one
            stopped.
        signals: Sent in turn, :data:`SIGNAL_TIMEOUT` seconds apart, until the server
            is gone or ``pidfile`` no longer names it.
        server_cwd: The server's working directory: the process ``pidfile`` names is
            signalled only while it works there (``directory`` or one inside it).

    Returns:
        The watchdog, or None where processes cannot be watched this way (not POSIX)
        or the watchdog could not be started; a :class:`RuntimeWarning` then says why.
    """
    if os.name != "posix":
        return None
    read_end, write_end = os.pipe()
    watchdog = Watchdog(write_end)  # before anything can fork
    arguments = [directory, pidfile, Path(os.path.realpath(server_cwd))]
    try:
        watchdog.pid = _launch(read_end, [os.path.abspath(path) for path in arguments], signals)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        # Our end stays open: should the launcher have got as far as starting a
        # watchdog, it must not remove the directory before this process ends.
        warnings.warn(
            f"pgnotify: no watchdog for {directory}, so its server outlives this process "
            f"if the process is killed: {exc}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    except BaseException:  # Ctrl-C: nothing will use the directory
        watchdog.close()
        raise
    finally:
        os.close(read_end)
    return watchdog


def _launch(read_end: int, paths: list[str], signals: Sequence[signal.Signals]) -> int:
    """Start this file as a watchdog reading ``read_end``; return the watchdog's pid.

    Raises:
        RuntimeError: ``sys.executable`` did not start it (it may be no Python).
        OSError: ``sys.executable`` cannot be run.
        subprocess.TimeoutExpired: The launcher took too long.
    """
    if not sys.executable:
        raise RuntimeError("sys.executable is not set")
    command = [
        sys.executable,
        "-I",  # by path, isolated: neither this package nor the caller's environment
        os.path.abspath(__file__),
        str(read_end),
        *paths,
        *(sig.name for sig in signals),
    ]
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
    said = launched.stdout.split()
    if launched.returncode != 0 or not said or not said[-1].isdigit():
        output = (launched.stderr.strip() or launched.stdout.strip())[-500:]
        raise RuntimeError(
            f"{sys.executable} -I {command[2]} exited with status {launched.returncode} "
            f"without starting it: {output or 'no output'}"
        )
    return int(said[-1])


def _stop_process(
    pidfile: Path,
    server_cwd: str,
    signals: Sequence[signal.Signals],
    timeout: float = SIGNAL_TIMEOUT,
) -> None:
    """Stop the server ``pidfile`` names, if it runs, sending ``signals`` in turn.

    Before each signal the process must still be the server (:func:`_server_pid`).
    Each signal gets ``timeout`` seconds; the process counts as stopped once it is
    gone or ``pidfile`` no longer names it (servers remove theirs as they exit).
    """
    for sig in signals:
        pid = _server_pid(pidfile, server_cwd)
        if pid is None or not _signal_server(pid, server_cwd, sig):
            return
        if _stopped_within(timeout, pidfile, pid):
            return


def _server_pid(pidfile: Path, server_cwd: str) -> int | None:
    """The pid ``pidfile`` names if that process is the server, else None.

    It is the server if its pid is above 1 (not every process, a process group or
    init), it runs (a zombie has ended), and it works in ``server_cwd`` (a stale
    pid file may name a pid that another process has since been given).
    """
    pid = _pid_in(pidfile)
    if pid is None or not _is_server(pid, server_cwd):
        return None
    return pid


def _is_server(pid: int, server_cwd: str) -> bool:
    return pid > 1 and _running(pid) and _cwd(pid) == server_cwd


def _signal_server(pid: int, server_cwd: str, sig: signal.Signals) -> bool:
    """Send ``sig`` to ``pid`` if it is the server still; False if it is not, or gone."""
    try:
        pidfd = _open_pidfd(pid)
    except ProcessLookupError:
        return False
    try:
        # Checked once the pidfd is open: it names the process checked, or one that
        # has ended since, and then the signal fails rather than hit the pid's next owner.
        if not _is_server(pid, server_cwd):
            return False
        if pidfd is None:
            os.kill(pid, sig)
        else:
            signal.pidfd_send_signal(pidfd, sig)
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return True


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` (Linux 5.3 and later), or None where there is none."""
    if not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal"):
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise
    except OSError:  # not supported by this kernel (or not allowed, as in some sandboxes)
        return None


def _cwd(pid: int) -> str | None:
    """The working directory of process ``pid``; None if it cannot be read."""
    if _HAS_PROC:
        try:
            return os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return None
    return _cwd_from_lsof(pid)


def _cwd_from_lsof(pid: int) -> str | None:
    """``lsof``'s answer to :func:`_cwd`, where there is no ``/proc`` (macOS, the BSDs)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])
    lsof = shutil.which("lsof", path=search)
    if lsof is None:
        return None
    try:
        listed = subprocess.run(
            [lsof, "-a", "-p", str(pid), "-d", "cwd", "-Fn"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line[1:] for line in listed.stdout.splitlines() if line.startswith("n")]
    return names[0] if listed.returncode == 0 and len(names) == 1 else None


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


def _watch(
    read_end: int, directory: str, pidfile: str, server_cwd: str, signals: list[signal.Signals]
) -> None:
    """The watchdog's life: wait for end-of-file, stop the server, remove the directory."""
    while os.read(read_end, 512):
        pass
    _stop_process(Path(pidfile), server_cwd, signals)
    shutil.rmtree(directory, ignore_errors=True)


def _main(argv: list[str]) -> None:
    read_end, directory, pidfile, server_cwd, *names = argv
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
    _watch(fd, directory, pidfile, server_cwd, signals)


if __name__ == "__main__":
    _main(sys.argv[1:])
