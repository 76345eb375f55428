"""The container's own figures (cgroup v1 and v2): parsers, the locator over fake trees,
the collector's families and JSON, and a real proxy reading a fake tree."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from trioproxy.metrics import MetricsCollector, container
from trioproxy.metrics.container import (
    CgroupDirs,
    ContainerReader,
    ContainerReading,
    locate,
    parse_cpu_max,
    parse_keyed,
    parse_mountinfo,
    parse_proc_cgroup,
)
from trioproxy.metrics.system import OFFLOAD_AFTER_SECONDS

from .conftest import ServerProcess
from .fakes import V2_FILES, make_tree, v2_mount

GiB = 1024**3
MiB = 1024**2
HOST = 64 * GiB  # the fake host's memory: a limit at or above it is none
V1_UNLIMITED = "9223372036854771712"  # 2^63 rounded down to a 4 KiB page: v1's "no limit"

# /proc/self/mountinfo lines: ID PARENT MAJ:MIN ROOT POINT OPTIONS OPTIONAL - FSTYPE SRC SUPER
TMPFS = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"


def v1_mounts(root: str = "/", cpu_point: str = "/sys/fs/cgroup/cpu,cpuacct") -> str:
    return (
        TMPFS
        + f"32 31 0:29 {root} {cpu_point} rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
        + f"35 31 0:32 {root} /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        + f"40 31 0:37 {root} /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n"
    )


def v1_cgroup(path: str) -> str:
    return f"12:memory:{path}\n11:cpu,cpuacct:{path}\n1:name=systemd:{path}\n0::/\n"


V1_MEMORY = {
    "memory.usage_in_bytes": str(300 * MiB),
    "memory.limit_in_bytes": str(512 * MiB),
    "memory.stat": f"cache 123\nrss 456\ninactive_file 7\ntotal_inactive_file {100 * MiB}\n",
    "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
}
V1_CPU = {
    "cpu.cfs_quota_us": "50000",
    "cpu.cfs_period_us": "100000",
    "cpu.stat": "nr_periods 1000\nnr_throttled 300\nthrottled_time 2500000000\n",
    "cpuacct.usage": "12500000000",
}
V1_READING = ContainerReading(
    cgroup_version=1,
    memory_working_set_bytes=200 * MiB,
    memory_limit_bytes=512 * MiB,
    cpu_limit_cores=0.5,
    cpu_usage_seconds=12.5,
    cpu_periods=1000,
    cpu_throttled_periods=300,
    cpu_throttled_seconds=2.5,
    oom_kills=2,
)
V2_READING = ContainerReading(
    cgroup_version=2,
    memory_working_set_bytes=200 * MiB,
    memory_limit_bytes=512 * MiB,
    cpu_limit_cores=1.5,
    cpu_usage_seconds=12.5,
    cpu_periods=1000,
    cpu_throttled_periods=300,
    cpu_throttled_seconds=2.5,
    oom_kills=1,
)


def read(root: Path) -> ContainerReading | None:
    return ContainerReader(str(root), host_memory=HOST).read()


# --------------------------------------------------------------------------- locating


def test_v1_namespaced_mount_shows_the_container_only(tmp_path: Path) -> None:
    """Docker on a v1 host: the process's path is the container's, and so is the mount's
    root; the container's cgroup is the mount point itself."""
    path = "/docker/0123abcd"
    tree = make_tree(
        tmp_path,
        v1_cgroup(path),
        v1_mounts(root=path),
        {"/sys/fs/cgroup/memory": V1_MEMORY, "/sys/fs/cgroup/cpu,cpuacct": V1_CPU},
    )
    assert read(tree) == V1_READING


def test_v1_private_namespace_path_is_root(tmp_path: Path) -> None:
    tree = make_tree(
        tmp_path,
        v1_cgroup("/"),
        v1_mounts(),
        {"/sys/fs/cgroup/memory": V1_MEMORY, "/sys/fs/cgroup/cpu,cpuacct": V1_CPU},
    )
    assert read(tree) == V1_READING


def test_v1_host_path_below_the_mount(tmp_path: Path) -> None:
    """A host's view (this sandbox's: memory at /process_api/<id>, the mount's root /): the
    directory is the mount point plus the path; the mount point's own files (the root
    cgroup's, the whole machine's) must not be read instead."""
    path = "/process_api/d7de7d45"
    tree = make_tree(
        tmp_path,
        v1_cgroup(path),
        v1_mounts(),
        {
            "/sys/fs/cgroup/memory": {"memory.usage_in_bytes": str(20 * GiB)},
            f"/sys/fs/cgroup/memory{path}": V1_MEMORY,
            f"/sys/fs/cgroup/cpu,cpuacct{path}": V1_CPU,
        },
    )
    assert read(tree) == V1_READING
    dirs = ContainerReader(str(tree)).dirs()
    assert dirs == CgroupDirs(
        1,
        f"/sys/fs/cgroup/memory{path}",
        f"/sys/fs/cgroup/cpu,cpuacct{path}",
        f"/sys/fs/cgroup/cpu,cpuacct{path}",
        # whose CPU quota binds too, up to the mount
        ("/sys/fs/cgroup/cpu,cpuacct/process_api", "/sys/fs/cgroup/cpu,cpuacct"),
    )


def test_v1_separate_cpu_and_cpuacct_mounts_on_a_hybrid_host(tmp_path: Path) -> None:
    """This sandbox's layout: cpu and cpuacct mounted apart, and a cgroup2 mount without
    controllers beside them (hybrid): v1 it is."""
    mountinfo = (
        TMPFS
        + "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
        + "33 31 0:30 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n"
        + "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        + v2_mount(point="/sys/fs/cgroup/unified")
    )
    cgroup = "4:memory:/process_api/x\n2:cpuacct:/\n1:cpu:/\n0::/\n"
    cpu = {k: v for k, v in V1_CPU.items() if k != "cpuacct.usage"}
    tree = make_tree(
        tmp_path,
        cgroup,
        mountinfo,
        {
            "/sys/fs/cgroup/memory/process_api/x": V1_MEMORY,
            "/sys/fs/cgroup/cpu": cpu,
            "/sys/fs/cgroup/cpuacct": {"cpuacct.usage": V1_CPU["cpuacct.usage"]},
            "/sys/fs/cgroup/unified": {"cpu.stat": "usage_usec 99\n"},
        },
    )
    assert read(tree) == V1_READING


def test_v2_namespaced(tmp_path: Path) -> None:
    """Docker/Kubernetes on a v2 host (private cgroup namespace): ``0::/``, and the
    container's cgroup is mounted at /sys/fs/cgroup."""
    tree = make_tree(tmp_path, "0::/\n", v2_mount(), {"/sys/fs/cgroup": V2_FILES})
    assert read(tree) == V2_READING


def test_v2_nested_path_below_the_mount(tmp_path: Path) -> None:
    path = "/kubepods.slice/kubepods-burstable.slice/cri-containerd-ab12.scope"
    tree = make_tree(
        tmp_path,
        f"0::{path}\n",
        v2_mount(),
        {"/sys/fs/cgroup": {"memory.stat": "inactive_file 0\n"}, f"/sys/fs/cgroup{path}": V2_FILES},
    )
    assert read(tree) == V2_READING


def test_v2_missing_directory_falls_back_to_the_mount_point(tmp_path: Path) -> None:
    """The host's cgroup namespace seen through a mount of the container's cgroup only
    (the path below the root is not there): the mount point is the container's cgroup."""
    tree = make_tree(
        tmp_path, "0::/system.slice/docker-ab12.scope\n", v2_mount(), {"/sys/fs/cgroup": V2_FILES}
    )
    assert read(tree) == V2_READING


def test_v2_path_outside_the_namespace_reads_the_mount_point(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, "0::/../../system.slice\n", v2_mount(), {"/sys/fs/cgroup": V2_FILES})
    assert read(tree) == V2_READING


def test_escaped_mount_point(tmp_path: Path) -> None:
    """mountinfo writes a space in a path as ``\\040``."""
    tree = make_tree(
        tmp_path, "0::/\n", v2_mount(point="/sys/fs/my\\040cgroup"), {"/sys/fs/my cgroup": V2_FILES}
    )
    assert read(tree) == V2_READING


def test_v2_limits_set_on_a_parent_slice_bind(tmp_path: Path) -> None:
    """A systemd service whose limits are on its slice (``MemoryMax=`` / ``CPUQuota=`` of
    trioproxy.slice), or a process in a child cgroup of its container (docker:dind's
    ``/init``): the proxy's own cgroup says ``max``, the ancestor binds. The tightest
    limit from the cgroup up to the mount counts, as the JVM reads it; above the mount
    nothing is read."""
    path = "/trioproxy.slice/trioproxy.service"
    unlimited = dict(V2_FILES, **{"memory.max": "max\n", "cpu.max": "max 100000\n"})
    slice_limits = {"memory.max": V2_FILES["memory.max"], "cpu.max": V2_FILES["cpu.max"]}
    tree = make_tree(
        tmp_path / "slice",
        f"0::{path}\n",
        v2_mount(),
        {
            "/sys/fs": {"memory.max": str(MiB), "cpu.max": "1000 100000"},  # not a cgroup
            "/sys/fs/cgroup/trioproxy.slice": slice_limits,
            f"/sys/fs/cgroup{path}": unlimited,
        },
    )
    assert read(tree) == V2_READING
    # the tightest of each wins, wherever it is
    leaf = dict(V2_FILES, **{"memory.max": str(GiB), "cpu.max": "50000 100000"})
    tree = make_tree(
        tmp_path / "init",
        "0::/init\n",
        v2_mount(),
        {"/sys/fs/cgroup": slice_limits, "/sys/fs/cgroup/init": leaf},
    )
    assert read(tree) == dataclasses.replace(V2_READING, cpu_limit_cores=0.5)


def test_v1_limits_set_on_a_parent_bind(tmp_path: Path) -> None:
    """v1: the memory controller's ``hierarchical_memory_limit`` is the tightest limit of
    the cgroup and its ancestors (the kernel's, even above the mount); the CPU quota of an
    ancestor within the mount is read as v2's."""
    path = "/system.slice/trioproxy.service"
    memory = dict(
        V1_MEMORY,
        **{
            "memory.limit_in_bytes": V1_UNLIMITED,
            "memory.stat": V1_MEMORY["memory.stat"] + f"hierarchical_memory_limit {512 * MiB}\n",
        },
    )
    cpu = dict(V1_CPU, **{"cpu.cfs_quota_us": "-1"})
    parent_cpu = {"cpu.cfs_quota_us": "50000", "cpu.cfs_period_us": "100000"}
    tree = make_tree(
        tmp_path,
        v1_cgroup(path),
        v1_mounts(),
        {
            f"/sys/fs/cgroup/memory{path}": memory,
            f"/sys/fs/cgroup/cpu,cpuacct{path}": cpu,
            "/sys/fs/cgroup/cpu,cpuacct/system.slice": parent_cpu,
        },
    )
    assert read(tree) == V1_READING


def test_no_cgroup_is_none(tmp_path: Path) -> None:
    assert read(tmp_path) is None  # no /proc at all (macOS)
    make_tree(tmp_path, "0::/\n", TMPFS, {})  # no cgroup filesystem mounted
    assert read(tmp_path) is None
    assert locate("garbage", "garbage", lambda d: True) is None


# --------------------------------------------------------------------------- values


def test_unlimited_values(tmp_path: Path) -> None:
    files = dict(V2_FILES, **{"memory.max": "max\n", "cpu.max": "max 100000\n"})
    tree = make_tree(tmp_path / "v2", "0::/\n", v2_mount(), {"/sys/fs/cgroup": files})
    reading = read(tree)
    assert reading is not None
    assert reading.memory_limit_bytes is None and reading.cpu_limit_cores is None
    assert reading.memory_working_set_bytes == 200 * MiB

    memory = dict(V1_MEMORY, **{"memory.limit_in_bytes": V1_UNLIMITED})
    cpu = dict(V1_CPU, **{"cpu.cfs_quota_us": "-1"})
    tree = make_tree(
        tmp_path / "v1",
        v1_cgroup("/"),
        v1_mounts(),
        {"/sys/fs/cgroup/memory": memory, "/sys/fs/cgroup/cpu,cpuacct": cpu},
    )
    reading = read(tree)
    assert reading is not None
    assert reading.memory_limit_bytes is None and reading.cpu_limit_cores is None
    assert reading.cpu_throttled_periods == 300  # the counters are there all the same


def test_a_limit_at_or_above_the_host_memory_is_none(tmp_path: Path) -> None:
    files = dict(V2_FILES, **{"memory.max": str(HOST)})
    tree = make_tree(tmp_path, "0::/\n", v2_mount(), {"/sys/fs/cgroup": files})
    reading = read(tree)
    assert reading is not None and reading.memory_limit_bytes is None
    below_it = ContainerReader(str(tree), host_memory=HOST + 1).read()
    assert below_it == dataclasses.replace(V2_READING, memory_limit_bytes=HOST)


def test_working_set_is_floored_at_zero_and_falls_back_to_usage(tmp_path: Path) -> None:
    files = dict(V2_FILES, **{"memory.stat": f"inactive_file {400 * MiB}\n"})
    tree = make_tree(tmp_path / "a", "0::/\n", v2_mount(), {"/sys/fs/cgroup": files})
    reading = read(tree)
    assert reading is not None and reading.memory_working_set_bytes == 0
    files = {k: v for k, v in V2_FILES.items() if k != "memory.stat"}
    tree = make_tree(tmp_path / "b", "0::/\n", v2_mount(), {"/sys/fs/cgroup": files})
    reading = read(tree)
    assert reading is not None and reading.memory_working_set_bytes == 300 * MiB


def test_missing_files_leave_their_figures_none(tmp_path: Path) -> None:
    """The v2 root cgroup (a bare host) has no memory.current; cpu.stat has no periods
    without the cpu controller; an old v1 kernel has no oom_kill line."""
    tree = make_tree(
        tmp_path / "v2", "0::/\n", v2_mount(), {"/sys/fs/cgroup": {"cpu.stat": "usage_usec 5\n"}}
    )
    assert read(tree) == ContainerReading(cgroup_version=2, cpu_usage_seconds=5e-6)
    memory = dict(V1_MEMORY, **{"memory.oom_control": "oom_kill_disable 0\nunder_oom 0\n"})
    tree = make_tree(
        tmp_path / "v1", "4:memory:/\n", v1_mounts(), {"/sys/fs/cgroup/memory": memory}
    )
    assert read(tree) == ContainerReading(
        cgroup_version=1, memory_working_set_bytes=200 * MiB, memory_limit_bytes=512 * MiB
    )


def test_garbage_content_reads_as_unknown(tmp_path: Path) -> None:
    garbage = dict.fromkeys(V2_FILES, "not a number\n\x00\xff -1 x y z\n")
    garbage["memory.current"] = "-5"
    garbage["cpu.max"] = "0 0"
    tree = make_tree(tmp_path, "0::/\n", v2_mount(), {"/sys/fs/cgroup": garbage})
    assert read(tree) == ContainerReading(cgroup_version=2)


def test_unreadable_file_is_none(tmp_path: Path) -> None:
    """A directory where a file should be (EISDIR), as an unreadable file would be."""
    tree = make_tree(tmp_path, "0::/\n", v2_mount(), {"/sys/fs/cgroup": V2_FILES})
    os.remove(tree / "sys/fs/cgroup/memory.max")
    (tree / "sys/fs/cgroup/memory.max").mkdir()
    reading = read(tree)
    assert reading is not None and reading.memory_limit_bytes is None
    assert reading.memory_working_set_bytes == 200 * MiB


def test_parsers() -> None:
    assert parse_proc_cgroup("12:memory:/a\n11:cpu,cpuacct:/b\n0::/c\nbad\n") == {
        "memory": "/a",
        "cpu": "/b",
        "cpuacct": "/b",
        "": "/c",
    }
    assert parse_proc_cgroup("0::/with:colon\n") == {"": "/with:colon"}
    (mount,) = parse_mountinfo(v2_mount(root="/a\\134b"))
    assert mount.root == "/a\\b" and mount.fstype == "cgroup2"
    assert parse_keyed("a 1\nb x\nc 2 3\n\nd -4\n") == {"a": 1, "d": -4}
    assert parse_cpu_max("max 100000") is None
    assert parse_cpu_max("50000 100000\n") == (50000, 100000)
    assert parse_cpu_max("50000") is None


# what a cgroup file or /proc/self/* could hold on a bad day
_TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(
        st.one_of(
            st.sampled_from(["max", "-1", "0", "-", "0::", "::", ":", "\\", "\\0", " "]),
            st.integers(min_value=-(2**70), max_value=2**70).map(str),
            st.sampled_from([*V2_FILES, "inactive_file", "oom_kill", "cgroup2", "cgroup"]),
            st.text(alphabet="/: \\-\n0189abc", max_size=12),
        ),
        max_size=30,
    ).map(" ".join),
)


@given(_TEXT, _TEXT)
def test_locating_never_raises(cgroup: str, mountinfo: str) -> None:
    result = locate(cgroup, mountinfo, lambda d: len(d) % 2 == 0)
    assert result is None or result.version in (1, 2)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted({*V2_FILES, *V1_MEMORY, *V1_CPU})), _TEXT))
def test_reading_never_raises(tmp_path: Path, contents: dict[str, str]) -> None:
    for version, cgroup, mounts, dirs in (
        (2, "0::/\n", v2_mount(), ("/sys/fs/cgroup",)),
        (1, v1_cgroup("/"), v1_mounts(), ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu,cpuacct")),
    ):
        root = tmp_path / f"v{version}"
        tree = make_tree(root, cgroup, mounts, dict.fromkeys(dirs, contents))
        reading = read(tree)
        assert reading is not None and reading.cgroup_version == version
        for value in reading.as_json().values():
            assert value is None or value >= 0


def test_this_machine_does_not_crash() -> None:
    reading = ContainerReader().read()
    if not os.path.exists("/proc/self/cgroup"):
        assert reading is None
        return
    assert reading is not None and reading.cgroup_version in (1, 2)
    assert reading.cpu_usage_seconds is None or reading.cpu_usage_seconds > 0
    dirs = ContainerReader().dirs()
    assert dirs is not None
    for found in (dirs.memory, dirs.cpu, dirs.cpuacct):
        assert found is None or os.path.isdir(found), found


# --------------------------------------------------------------------------- the collector


def families(collector: MetricsCollector) -> dict[str, float]:
    body, _ = collector.render_prometheus()
    return {
        s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
    }


CONTAINER_SAMPLES = {
    "trioproxy_container_memory_working_set_bytes": 200.0 * MiB,
    "trioproxy_container_memory_limit_bytes": 512.0 * MiB,
    "trioproxy_container_cpu_limit_cores": 1.5,
    "trioproxy_container_cpu_usage_seconds_total": 12.5,
    "trioproxy_container_cpu_periods_total": 1000.0,
    "trioproxy_container_cpu_throttled_periods_total": 300.0,
    "trioproxy_container_cpu_throttled_seconds_total": 2.5,
    "trioproxy_container_oom_kills_total": 1.0,
}


@pytest.fixture
def v2_tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path, "0::/\n", v2_mount(), {"/sys/fs/cgroup": V2_FILES})


def test_collector_exposes_the_container(v2_tree: Path) -> None:
    c = MetricsCollector(multiprocess=False, container_root=str(v2_tree))
    exposed = families(c)
    assert {k: v for k, v in exposed.items() if "_container_" in k} == CONTAINER_SAMPLES
    assert c.summary()["system"]["container"] == V2_READING.as_json()
    assert c.filtered_summary()["system"]["container"] == V2_READING.as_json()
    # the files are read at every scrape: counters move with the kernel's
    (v2_tree / "sys/fs/cgroup/memory.events").write_text("oom_kill 3\n")
    assert families(c)["trioproxy_container_oom_kills_total"] == 3.0


def test_limits_are_read_again_once_a_minute_usage_every_time(
    v2_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrape read every file; the limits change only when someone changes them, so they
    are kept for LIMITS_SECONDS (a limit set meanwhile shows within that bound)."""
    now = [1000.0]
    monkeypatch.setattr(container.time, "perf_counter", lambda: now[0])
    reader = ContainerReader(str(v2_tree), host_memory=64 << 30)
    first = reader.read()
    assert first is not None and first.memory_limit_bytes == 512 * MiB
    cgroup = v2_tree / "sys/fs/cgroup"
    (cgroup / "memory.max").write_text(str(1024 * MiB))
    (cgroup / "cpu.max").write_text("max 100000")
    (cgroup / "memory.current").write_text(str(400 * MiB))
    now[0] += container.LIMITS_SECONDS - 1
    kept = reader.read()
    assert kept is not None
    assert (kept.memory_limit_bytes, kept.cpu_limit_cores) == (512 * MiB, 1.5)
    assert kept.memory_working_set_bytes == 300 * MiB  # usage: read now
    now[0] += 1
    fresh = reader.read()
    assert fresh is not None
    assert (fresh.memory_limit_bytes, fresh.cpu_limit_cores) == (1024 * MiB, None)


def test_collector_without_limits_has_no_limit_families(v2_tree: Path) -> None:
    (v2_tree / "sys/fs/cgroup/memory.max").write_text("max\n")
    (v2_tree / "sys/fs/cgroup/cpu.max").write_text("max 100000\n")
    exposed = families(MetricsCollector(multiprocess=False, container_root=str(v2_tree)))
    assert "trioproxy_container_memory_limit_bytes" not in exposed
    assert "trioproxy_container_cpu_limit_cores" not in exposed
    assert exposed["trioproxy_container_memory_working_set_bytes"] == 200.0 * MiB


def test_collector_without_cgroup_or_system_metrics(tmp_path: Path, v2_tree: Path) -> None:
    for c in (
        MetricsCollector(multiprocess=False, container_root=str(tmp_path / "nothing")),
        MetricsCollector(multiprocess=False, container_root=str(v2_tree), system_enabled=False),
    ):
        assert not [k for k in families(c) if "_container_" in k]
        container = c.summary()["system"]["container"]
        assert set(container) == set(V2_READING.as_json())
        assert set(container.values()) == {None}


async def test_stop_freezes_the_container(v2_tree: Path) -> None:
    c = MetricsCollector(multiprocess=False, container_root=str(v2_tree))
    assert (await c.read_summary())["system"]["container"]["oom_kills"] == 1
    c.stop()
    (v2_tree / "sys/fs/cgroup/memory.events").write_text("oom_kill 3\n")
    assert (await c.read_summary())["system"]["container"]["oom_kills"] == 1
    assert families(c)["trioproxy_container_oom_kills_total"] == 1.0


async def test_a_slow_read_moves_later_reads_off_the_event_loop(
    v2_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = MetricsCollector(multiprocess=False, container_root=str(v2_tree))
    reader = c._container
    threads: list[int] = []
    real_read = reader.read

    def slow_read() -> ContainerReading | None:
        threads.append(threading.get_ident())
        reading = real_read()
        reader.last_read_seconds = OFFLOAD_AFTER_SECONDS * 2  # as if the read had stalled
        return reading

    monkeypatch.setattr(reader, "read", slow_read)
    reader.dirs()  # located already (the first read is in a thread anyway: below)
    loop = threading.get_ident()
    body, _ = await c.read_prometheus()
    assert b"trioproxy_container_oom_kills_total 1.0" in body
    assert threads == [loop]
    await c.read_prometheus()
    summary = await c.read_summary()
    assert summary["system"]["container"] == V2_READING.as_json()
    assert len(threads) == 3 and loop not in threads[1:]
    await trio.lowlevel.checkpoint()


async def test_reads_come_back_to_the_loop_after_quick_ones_in_the_thread(
    v2_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read held up (a stalled filesystem, or only another process holding the CPU)
    moves reads to a thread; a run of quick reads there brings them back to the loop,
    and a slow one in the run starts it over."""
    from trioproxy.metrics import collector

    monkeypatch.setattr(collector, "FAST_READS_TO_RETURN", 3)
    c = MetricsCollector(multiprocess=False, container_root=str(v2_tree))
    reader = c._container
    reader.dirs()  # located: the first read is on the loop
    seconds = iter([OFFLOAD_AFTER_SECONDS * 2, 0.001, 0.001, 0.5, 0.001, 0.001, 0.001, 0.001])
    threads: list[int] = []
    real_read = reader.read

    def read() -> ContainerReading | None:
        threads.append(threading.get_ident())
        reading = real_read()
        reader.last_read_seconds = next(seconds)
        return reading

    monkeypatch.setattr(reader, "read", read)
    loop = threading.get_ident()
    for _ in range(8):
        assert (await c.read_summary())["system"]["container"] == V2_READING.as_json()
    on_loop = [thread == loop for thread in threads]
    # slow on the loop; 2 quick, 1 slow (starts over), 3 quick in the thread; the loop
    assert on_loop == [True, False, False, False, False, False, False, True]


async def test_the_first_read_parses_the_mount_table_off_the_event_loop(
    v2_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first read finds the directories in ``/proc/self/mountinfo``: megabytes on a
    node with thousands of mounts seen from a host-network pod."""
    c = MetricsCollector(multiprocess=False, container_root=str(v2_tree))
    reader = c._container
    threads: list[int] = []
    real_dirs = reader.dirs

    def dirs() -> CgroupDirs | None:
        threads.append(threading.get_ident())
        return real_dirs()

    monkeypatch.setattr(reader, "dirs", dirs)
    loop = threading.get_ident()
    await c.read_summary()
    assert threads and threads[0] != loop
    threads.clear()
    await c.read_summary()  # found: later reads are quick, on the loop
    assert set(threads) <= {loop}


# --------------------------------------------------------------------------- a real proxy


def test_proxy_reads_the_tree_it_is_given(
    v2_tree: Path, demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    """SYSTEM_METRICS_FS_ROOT: the proxy's scrape and JSON carry the fake tree's figures."""
    url = start_proxy(demo_backend.url, SYSTEM_METRICS_FS_ROOT=str(v2_tree)).url
    text = httpx.get(f"{url}/v1/metrics/prometheus", timeout=5).text
    exposed = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert {k: v for k, v in exposed.items() if "_container_" in k} == CONTAINER_SAMPLES
    system = httpx.get(f"{url}/v1/metrics", timeout=5).json()["system"]
    assert system["container"] == V2_READING.as_json()
    assert system["cpu_usage_percent"] is not None  # the host's keys are all still there


def test_proxy_on_this_machine(proxy: ServerProcess) -> None:
    """The real cgroup of the machine the tests run on: read without an error."""
    container = httpx.get(f"{proxy.url}/v1/metrics", timeout=5).json()["system"]["container"]
    assert set(container) == set(V2_READING.as_json())
    text = httpx.get(f"{proxy.url}/v1/metrics/prometheus", timeout=5).text
    if container["cgroup_version"] is not None:
        assert "trioproxy_container_cpu_usage_seconds_total" in text or (
            container["cpu_usage_seconds"] is None
        )
