"""Thread pools follow the container's CPU quota (preftune.launch.threads), not the node's cores.

The cgroup files are written into a temporary directory laid out like /sys/fs/cgroup (v2, nested v2, v1); the
CPUs the test process may use are pinned with monkeypatch, so the results do not depend on this machine.
The image's smoke test (``make image``) checks the same under a real ``--cpus 1`` quota.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from preftune.launch import threads


@pytest.fixture
def cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process may run on 16 CPUs; no OMP_NUM_THREADS of the user's."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    for name in threads.THREADS_ENV:
        monkeypatch.delenv(name, raising=False)


def v2(tmp_path: Path, cpu_max: str, own: str = "/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    directory = root / own.strip("/")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


@pytest.mark.usefixtures("cpus")
@pytest.mark.parametrize(
    ("cpu_max", "limit", "count"),
    [
        ("max 100000", None, 16),  # no quota: every CPU this process may use
        ("400000 100000", 4.0, 4),
        ("250000 100000", 2.5, 2),  # rounded down: 3 threads on 2.5 CPUs would be throttled
        ("50000 100000", 0.5, 1),  # at least one
        ("6400000 100000", 64.0, 16),  # a quota above the CPUs this process may use
    ],
)
def test_thread_count_follows_the_cgroup_v2_quota(
    tmp_path: Path, cpu_max: str, limit: float | None, count: int
) -> None:
    root, proc = v2(tmp_path, cpu_max)
    assert threads.cgroup_cpu_limit(root, proc) == limit
    assert threads.available_cpus(root, proc) == count
    assert threads.thread_count(1, root, proc) == count


@pytest.mark.usefixtures("cpus")
def test_the_smallest_quota_of_the_nested_cgroups_applies(tmp_path: Path) -> None:
    root, proc = v2(tmp_path, "800000 100000", own="/kubepods/pod1/ctr")
    (root / "kubepods" / "pod1" / "cpu.max").write_text("300000 100000\n")  # the pod's limit
    (root / "kubepods" / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(root, proc) == 3.0
    assert threads.thread_count(1, root, proc) == 3


@pytest.mark.usefixtures("cpus")
def test_cgroup_v1_quota(tmp_path: Path) -> None:
    cpu = tmp_path / "cgroup" / "cpu,cpuacct"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("600000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "none"
    assert threads.thread_count(1, tmp_path / "cgroup", proc) == 6
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert threads.thread_count(1, tmp_path / "cgroup", proc) == 16


@pytest.mark.usefixtures("cpus")
def test_workers_share_the_quota_and_a_users_setting_is_never_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, proc = v2(tmp_path, "800000 100000")
    assert threads.thread_count(2, root, proc) == 4  # two torchrun workers on 8 CPUs
    assert threads.thread_count(16, root, proc) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.thread_count(1, root, proc) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "32")
    assert threads.thread_count(1, root, proc) == 8


@pytest.mark.usefixtures("cpus")
def test_limit_threads_sets_torch_and_openmp_for_this_process_and_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    root, proc = v2(tmp_path, "200000 100000")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)  # what torch picks on a big node
        assert threads.limit_threads(root, proc) == 2
        assert torch.get_num_threads() == 2
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "2"
        torch.set_num_threads(1)  # a pool already smaller (a test's one_thread, a user's choice) stays
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert threads.limit_threads(root, proc) == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_this_machine_reads_without_error() -> None:
    assert threads.available_cpus() >= 1
