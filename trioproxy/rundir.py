"""The ``--workers`` master's run directory (metrics files, hypercorn's config), and the
removal of those a master killed outright left behind.

A master removes its directory when it stops; one killed by SIGKILL (the OOM killer, a
supervisor's last resort) cannot. Under Kubernetes ``/tmp`` is an ``emptyDir`` that
outlives container restarts, so a crash-looping pod would fill it. So each master holds a
lock on a file in its directory for as long as it lives (the kernel lets go of it however
the process ends), and a new master removes the directories whose lock nobody holds. A
lock, not a process id: ids are reused (a container's master is often pid 1 every time)
and mean nothing across the PID namespaces of containers that share a volume.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "trioproxy-"
LOCK_FILE = "master.lock"

log = logging.getLogger("trioproxy")
_held: list[int] = []  # this process's lock: open until it exits (never inherited)


def new_run_dir() -> Path:
    """A fresh run directory, locked for this process's life, after removing stale ones."""
    remove_stale(Path(tempfile.gettempdir()))
    run_dir = Path(tempfile.mkdtemp(prefix=PREFIX))
    # locked before it takes its name: another master sweeping now never finds it free
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(run_dir / ".lock", run_dir / LOCK_FILE)
    _held.append(fd)
    # the directory itself too (shared: it only says "in use"): systemd-tmpfiles' age-based
    # cleanup of /tmp (10 days on Fedora, RHEL, Arch) skips a directory a process holds a
    # BSD lock on, and all below it, but not a locked file in it (systemd 252): it took the
    # lock file and the metrics files nobody had read or written for that long
    dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(dir_fd, fcntl.LOCK_SH)
    _held.append(dir_fd)
    return run_dir


def remove_stale(parent: Path) -> int:
    """Remove the run directories in ``parent`` that are this user's and whose lock no
    process holds; how many. A directory without a lock file (an older version's, or one
    being created right now) is left alone."""
    removed = 0
    for candidate in parent.glob(PREFIX + "*"):
        try:
            if candidate.is_symlink() or candidate.stat().st_uid != os.getuid():
                continue
            fd = os.open(candidate / LOCK_FILE, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its master lives
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            shutil.rmtree(candidate)
            removed += 1
    if removed:
        log.info("removed %d run directories of trioproxy masters that are gone", removed)
    return removed
