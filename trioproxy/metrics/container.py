"""The proxy's own container: its cgroup's memory and CPU limits and usage (v1 and v2).

psutil reads the host's ``/proc``: in a container its CPU and memory figures are the
node's, and nothing there says how close the proxy is to its own memory limit (the OOM
killer) or how often its CPU quota throttles it. The kernel says so in the cgroup files,
which this module reads as the kubelet (cAdvisor) and the JVM do:

* where: ``/proc/self/cgroup`` names the process's cgroup, ``/proc/self/mountinfo`` where
  each hierarchy is mounted and which part of it the mount shows (its root: ``/`` when the
  container has its own cgroup namespace, the container's path when it sees the host's);
  the cgroup's directory is the mount point plus the path below that root, or the mount
  point itself when that directory is not there (:func:`locate`). Found once per process.
* what: the few small files of the memory and CPU controllers, at every read (a scrape;
  the limits' files at most every ``LIMITS_SECONDS``, a minute): memory usage minus the
  inactive page cache (the *working set*, what
  ``container_memory_working_set_bytes`` reports and the OOM killer goes by), the memory
  limit, the CPU quota, CPU time, CFS periods and throttling, and OOM kills.

Parsing is pure (text in, figures out, nothing raised on any input); :class:`ContainerReader`
does the reading. A file that is missing or unreadable leaves its figure ``None``; no
cgroup at all (macOS, a ``/proc`` without cgroups) makes the whole reading ``None``.
"""

from __future__ import annotations

import math
import os
import posixpath
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# cgroup files are a few hundred bytes (memory.stat a few KiB); a bound against a file
# that is not what it should be (a fake tree, an odd mount)
_MAX_FILE_BYTES = 64 * 1024
# /proc/self/mountinfo of a Kubernetes node seen from a host-network pod can hold
# thousands of mounts; read once per process
_MAX_MOUNTINFO_BYTES = 4 * 1024 * 1024
_V1_CONTROLLERS = ("memory", "cpu", "cpuacct")
# the ancestors whose limits are read (a systemd unit below two slices, a Kubernetes
# container seen from the host: four); a bound against a path of a thousand parts
_MAX_PARENTS = 16


@dataclass(frozen=True, slots=True)
class CgroupMount:
    """A cgroup filesystem mounted somewhere (a line of ``/proc/self/mountinfo``)."""

    root: str  # the part of the hierarchy the mount shows
    mount_point: str
    fstype: str  # "cgroup" (v1) or "cgroup2"
    options: frozenset[str]  # v1: the controllers ("memory", "cpu", "cpuacct", ...)


@dataclass(frozen=True, slots=True)
class CgroupDirs:
    """The process's cgroup directories (absolute, as the process sees them)."""

    version: int  # 1 or 2
    memory: str | None
    cpu: str | None
    cpuacct: str | None  # v1's CPU time; v2 has it in the cpu directory's cpu.stat
    # the directories above the one whose limits are read (v2's, v1's cpu directory), up
    # to the mount point, nearest first: a limit there binds too (a systemd slice's, a
    # container's when the process is in a child cgroup of it). v1's memory.stat says
    # its hierarchy's memory limit itself (``hierarchical_memory_limit``)
    parents: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ContainerReading:
    """One read of the container's figures; ``None``: the kernel did not say."""

    cgroup_version: int
    memory_working_set_bytes: int | None = None
    memory_limit_bytes: int | None = None  # None: no limit (or unknown)
    cpu_limit_cores: float | None = None  # quota / period; None: no quota
    cpu_usage_seconds: float | None = None
    cpu_periods: int | None = None
    cpu_throttled_periods: int | None = None
    cpu_throttled_seconds: float | None = None
    oom_kills: int | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def unknown_container() -> dict[str, Any]:
    """The JSON ``container`` object when nothing is known: every key, ``null``."""
    return dict.fromkeys(ContainerReading.__dataclass_fields__)


# --------------------------------------------------------------------------- parsers


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` -> {controller: path}; v2's line (``0::/path``) under ``""``.
    Named hierarchies (``name=systemd``) are kept by their name."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            paths[""] = path
            continue
        for controller in controllers.split(","):
            if controller:
                paths.setdefault(controller, path)
    return paths


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup mounts of ``/proc/self/mountinfo`` (``ID PARENT MAJ:MIN ROOT POINT
    OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS``), in the file's order."""
    mounts: list[CgroupMount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            dash = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < dash + 3 or fields[dash + 1] not in ("cgroup", "cgroup2"):
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if not root.startswith("/") or not point.startswith("/"):
            continue
        options = frozenset(fields[dash + 3].split(",")) if len(fields) > dash + 3 else frozenset()
        mounts.append(CgroupMount(root, point, fields[dash + 1], options))
    return mounts


def cgroup_dir_candidates(mount: CgroupMount, path: str) -> tuple[str, ...]:
    """Where the cgroup ``path`` can be under ``mount``, best first: the mount point plus
    the path below the mount's root, then the mount point itself (a container that sees
    the host's cgroup namespace but has only its own cgroup mounted, as the JVM and
    automaxprocs fall back to)."""
    point = mount.mount_point
    root = mount.root.rstrip("/")
    if ".." in path.split("/"):  # outside this namespace's view: only the mount itself
        return (point,)
    if path == root or path.startswith(root + "/"):
        below = path[len(root) :].strip("/")
        if below:
            return (posixpath.join(point, below), point)
    return (point,)


def parents_within(directory: str, mount_point: str) -> tuple[str, ...]:
    """The directories above ``directory`` up to ``mount_point`` (a cgroup directory below
    it, or the mount point itself: none), nearest first, at most ``_MAX_PARENTS``."""
    inside = mount_point.rstrip("/") + "/"
    parents: list[str] = []
    while directory != mount_point and len(parents) < _MAX_PARENTS:
        directory = posixpath.dirname(directory)
        if directory != mount_point and not directory.startswith(inside):
            break
        parents.append(directory)
    return tuple(parents)


def locate(proc_cgroup: str, mountinfo: str, is_dir: Callable[[str], bool]) -> CgroupDirs | None:
    """The process's cgroup directories, from the texts of ``/proc/self/cgroup`` and
    ``/proc/self/mountinfo``; ``is_dir(path)`` says whether a directory exists. v1 when a
    memory, cpu or cpuacct hierarchy is mounted and the process is in it (a hybrid host's
    cgroup2 mount then holds no controller), else v2; None when neither is found."""
    paths = parse_proc_cgroup(proc_cgroup)
    mounts = parse_mountinfo(mountinfo)

    def find(fstype: str, path: str | None, controller: str | None) -> tuple[str, str] | None:
        """The directory, and the mount point it is under."""
        if path is None:
            return None
        chosen = [
            m
            for m in mounts
            if m.fstype == fstype and (controller is None or controller in m.options)
        ]
        best_first = [
            (c, m.mount_point) for m in chosen for c in cgroup_dir_candidates(m, path)[:-1]
        ]
        best_first += [(m.mount_point, m.mount_point) for m in chosen]
        return next((found for found in best_first if is_dir(found[0])), None)

    v1 = {c: find("cgroup", paths.get(c), c) for c in _V1_CONTROLLERS}
    if any(v1.values()):
        memory, cpu, cpuacct = (v1[c] for c in _V1_CONTROLLERS)
        parents = parents_within(*cpu) if cpu else ()
        return CgroupDirs(1, memory and memory[0], cpu and cpu[0], cpuacct and cpuacct[0], parents)
    unified = find("cgroup2", paths.get(""), None)
    if unified is None:
        return None
    directory = unified[0]
    return CgroupDirs(2, directory, directory, directory, parents_within(*unified))


def parse_int(text: str | None) -> int | None:
    """A file holding one integer (``memory.current``, ``cpuacct.usage``)."""
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def parse_keyed(text: str | None) -> dict[str, int]:
    """A flat-keyed file (``memory.stat``, ``cpu.stat``, ``memory.events``,
    ``memory.oom_control``): ``key value`` lines; lines that are not are skipped."""
    values: dict[str, int] = {}
    if text is None:
        return values
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return values


def parse_cpu_max(text: str | None) -> tuple[int, int] | None:
    """v2 ``cpu.max`` (``QUOTA PERIOD``, ``max 100000`` without a quota) -> (quota, period)
    in µs, None without a quota."""
    if text is None:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    quota, period = parse_int(parts[0]), parse_int(parts[1])
    return None if quota is None or period is None else (quota, period)


def tightest_memory_limit(values: Iterable[int | None], host_memory_bytes: int) -> int | None:
    """The least of the limits among ``values`` (:func:`memory_limit`), None without one."""
    limits = (memory_limit(value, host_memory_bytes) for value in values)
    return min((limit for limit in limits if limit is not None), default=None)


def tightest_cpu_limit(quotas: Iterable[tuple[int | None, int | None]]) -> float | None:
    """The least of the CPU limits among (quota, period) pairs, in cores; None without."""
    cores = (cpu_limit_cores(quota, period) for quota, period in quotas)
    return min((limit for limit in cores if limit is not None), default=None)


def memory_limit(value: int | None, host_memory_bytes: int) -> int | None:
    """A limit, or None when there is none: v1 writes "none" as a page-rounded 2^63, and a
    limit at or above the host's memory binds nothing either (v2's ``max`` never parses)."""
    if value is None or value <= 0 or (host_memory_bytes > 0 and value >= host_memory_bytes):
        return None
    return value


def cpu_limit_cores(quota: int | None, period: int | None) -> float | None:
    """quota / period in cores; None without a quota (v1: -1) or with a nonsense one."""
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota / period


def working_set(usage: int | None, inactive_file: int | None) -> int | None:
    """Usage minus the inactive page cache, floored at 0 (cAdvisor's working set: the
    inactive cache is what the kernel reclaims before it kills); usage itself when the
    stat file says nothing of it."""
    if usage is None:
        return None
    if inactive_file is None:
        return usage
    return max(usage - inactive_file, 0)


def _non_negative(value: int | None) -> int | None:
    return value if value is not None and value >= 0 else None


def _seconds(value: int | None, per_second: float) -> float | None:
    value = _non_negative(value)
    return None if value is None else value / per_second


def reading_v2(
    files: Mapping[str, str | None],
    host_memory_bytes: int,
    parents: Sequence[Mapping[str, str | None]] = (),
) -> ContainerReading:
    """The figures of a v2 cgroup from its files' texts (None: unreadable); its limits
    are the tightest of its own and its ``parents``' (their ``memory.max`` and
    ``cpu.max``)."""
    stat = parse_keyed(files.get("memory.stat"))
    cpu = parse_keyed(files.get("cpu.stat"))
    events = parse_keyed(files.get("memory.events"))
    levels = (files, *parents)
    return ContainerReading(
        cgroup_version=2,
        memory_working_set_bytes=working_set(
            _non_negative(parse_int(files.get("memory.current"))), stat.get("inactive_file")
        ),
        memory_limit_bytes=tightest_memory_limit(
            (parse_int(level.get("memory.max")) for level in levels), host_memory_bytes
        ),
        cpu_limit_cores=tightest_cpu_limit(
            parse_cpu_max(level.get("cpu.max")) or (None, None) for level in levels
        ),
        cpu_usage_seconds=_seconds(cpu.get("usage_usec"), 1e6),
        cpu_periods=_non_negative(cpu.get("nr_periods")),
        cpu_throttled_periods=_non_negative(cpu.get("nr_throttled")),
        cpu_throttled_seconds=_seconds(cpu.get("throttled_usec"), 1e6),
        oom_kills=_non_negative(events.get("oom_kill")),
    )


def reading_v1(
    files: Mapping[str, str | None],
    host_memory_bytes: int,
    parents: Sequence[Mapping[str, str | None]] = (),
) -> ContainerReading:
    """The figures of v1 cgroups from their files' texts (None: unreadable); the memory
    limit is the tightest of its own and its hierarchy's (``memory.stat``), the CPU
    quota the tightest of its own and its ``parents``' (``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``)."""
    stat = parse_keyed(files.get("memory.stat"))
    cpu = parse_keyed(files.get("cpu.stat"))
    oom = parse_keyed(files.get("memory.oom_control"))  # oom_kill since Linux 4.13
    return ContainerReading(
        cgroup_version=1,
        memory_working_set_bytes=working_set(
            _non_negative(parse_int(files.get("memory.usage_in_bytes"))),
            stat.get("total_inactive_file"),
        ),
        memory_limit_bytes=tightest_memory_limit(
            (parse_int(files.get("memory.limit_in_bytes")), stat.get("hierarchical_memory_limit")),
            host_memory_bytes,
        ),
        cpu_limit_cores=tightest_cpu_limit(
            (parse_int(level.get("cpu.cfs_quota_us")), parse_int(level.get("cpu.cfs_period_us")))
            for level in (files, *parents)
        ),
        cpu_usage_seconds=_seconds(parse_int(files.get("cpuacct.usage")), 1e9),
        cpu_periods=_non_negative(cpu.get("nr_periods")),
        cpu_throttled_periods=_non_negative(cpu.get("nr_throttled")),
        cpu_throttled_seconds=_seconds(cpu.get("throttled_time"), 1e9),
        oom_kills=_non_negative(oom.get("oom_kill")),
    )


# which files of which directory each version reads
_V1_FILES = {
    "memory": ("memory.usage_in_bytes", "memory.limit_in_bytes", "memory.stat",
               "memory.oom_control"),
    "cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.stat"),
    "cpuacct": ("cpuacct.usage",),
}  # fmt: skip
_V2_FILES = ("memory.current", "memory.max", "memory.stat", "memory.events", "cpu.max",
             "cpu.stat")  # fmt: skip
# ... of each parent directory (CgroupDirs.parents)
_PARENT_FILES = {1: ("cpu.cfs_quota_us", "cpu.cfs_period_us"), 2: ("memory.max", "cpu.max")}
# the limits, which change only when someone changes them (``docker update``, a pod
# resized in place): read again once they are this old; usage and counters at every read
LIMITS_SECONDS = 60.0
_LIMIT_FILES = frozenset(
    ("memory.limit_in_bytes", "cpu.cfs_quota_us", "cpu.cfs_period_us", "memory.max", "cpu.max")
)


# --------------------------------------------------------------------------- reading


def _read_text(path: str, limit: int = _MAX_FILE_BYTES) -> str | None:
    # os.read, not open(): a third less per file (no buffered reader to build)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, ValueError):  # ValueError: a NUL in a path from a strange mountinfo
        return None
    parts: list[bytes] = []
    size = 0
    try:
        while size < limit:
            part = os.read(fd, limit - size)
            if not part:
                break
            parts.append(part)
            size += len(part)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(parts).decode("utf-8", "replace")


def host_memory_bytes() -> int:
    """The machine's memory (0 when unknown): a limit at or above it limits nothing."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not on every platform
        return 0


class ContainerReader:
    """Reads the container's figures: the directories are found at the first read and kept
    (the process's cgroup does not change under it), the limits' files once a minute
    (:data:`LIMITS_SECONDS`) and the others every time.

    ``root`` is the directory ``/proc/self/...`` and the cgroup mounts are looked up under
    (``/``; a fake tree in tests). ``host_memory`` (default: this machine's) is the size at
    or above which a memory limit counts as none. Thread-safe: two reads at once at most
    find the directories twice."""

    def __init__(self, root: str = "/", *, host_memory: int | None = None) -> None:
        self.root = root
        self.host_memory = host_memory_bytes() if host_memory is None else host_memory
        self._dirs: CgroupDirs | None = None
        self._located = False
        self.last_read_seconds = 0.0
        self._limits: dict[str, str | None] = {}  # path -> text, read at _limits_at
        self._limits_at = -math.inf

    @property
    def located(self) -> bool:
        """Whether the directories were looked for already (the first read parses
        ``/proc/self/mountinfo``: up to 4 MiB on a node with thousands of mounts)."""
        return self._located

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def dirs(self) -> CgroupDirs | None:
        """The cgroup directories (as the process sees them), found on the first call."""
        if not self._located:
            proc_cgroup = _read_text(self._path("/proc/self/cgroup"))
            mountinfo = _read_text(self._path("/proc/self/mountinfo"), _MAX_MOUNTINFO_BYTES)
            found = None
            if proc_cgroup is not None and mountinfo is not None:
                found = locate(proc_cgroup, mountinfo, lambda d: os.path.isdir(self._path(d)))
            self._dirs, self._located = found, True
        return self._dirs

    def read(self) -> ContainerReading | None:
        """The figures now; None when the process is in no cgroup this can find."""
        t0 = time.perf_counter()
        try:
            dirs = self.dirs()
            if dirs is None:
                return None
            if t0 - self._limits_at >= LIMITS_SECONDS:
                self._limits, self._limits_at = {}, t0
            parents = [self._files([(d, _PARENT_FILES[dirs.version])]) for d in dirs.parents]
            if dirs.version == 2:
                files = self._files([(dirs.memory, _V2_FILES)])
                return reading_v2(files, self.host_memory, parents)
            files = self._files(
                [
                    (dirs.memory, _V1_FILES["memory"]),
                    (dirs.cpu, _V1_FILES["cpu"]),
                    (dirs.cpuacct, _V1_FILES["cpuacct"]),
                ]
            )
            return reading_v1(files, self.host_memory, parents)
        finally:
            self.last_read_seconds = time.perf_counter() - t0

    def _files(self, where: list[tuple[str | None, tuple[str, ...]]]) -> dict[str, str | None]:
        files: dict[str, str | None] = {}
        limits = self._limits
        for directory, names in where:
            if directory is not None:
                for name in names:
                    path = self._path(posixpath.join(directory, name))
                    if name not in _LIMIT_FILES:
                        files[name] = _read_text(path)
                    elif path in limits:
                        files[name] = limits[path]
                    else:
                        files[name] = limits[path] = _read_text(path)
        return files
