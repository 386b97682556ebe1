"""CPU threads that fit the CPUs a process may use; bf16 and peak figures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cyclegan import hardware


def test_cgroup_v2_quota_is_read_from_cpu_max(tmp_path: Path) -> None:
    """A pod limited to 1.5 CPUs (cgroup v2 `cpu.max`): 1.5, whatever the node has."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert hardware.quota_cpus(tmp_path) == pytest.approx(1.5)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert hardware.quota_cpus(tmp_path) is None  # no limit


def test_cgroup_v1_quota_is_read_from_cfs_files(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("50000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    assert hardware.quota_cpus(tmp_path) == pytest.approx(0.5)
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert hardware.quota_cpus(tmp_path) is None


def test_auto_threads_follow_quota_ranks_and_workers(monkeypatch) -> None:
    """The arithmetic of `num_threads: auto`. This machine has no CPU quota, so the cgroup
    and the affinity are stood in for by replacing the two readers (a mock: the readers
    themselves are tested above on real files)."""
    monkeypatch.setattr(hardware, "affinity_cpus", lambda: 64)
    monkeypatch.setattr(hardware, "quota_cpus", lambda: 4.0)
    assert hardware.choose_threads("auto").threads == 4  # the quota, not the node's 64
    assert hardware.choose_threads("auto", local_ranks=2).threads == 2
    assert hardware.choose_threads("auto", local_ranks=2, loader_workers=1).threads == 1
    assert "cgroup quota 4 CPUs" in hardware.choose_threads("auto").reason
    assert hardware.choose_threads(3).threads == 3  # a number is a number


def test_auto_threads_leave_busy_cpus_to_their_owners() -> None:
    """With two busy processes on this machine, auto (load-aware) takes fewer threads than
    the CPUs it sees; without the load (evaluation) it takes them all."""
    import subprocess
    import sys
    import time

    cpus = hardware.affinity_cpus()
    if hardware.quota_cpus() is not None or cpus < 2:
        pytest.skip("needs an unlimited process on 2+ CPUs")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        deadline = time.monotonic() + 10
        while hardware.runnable_others() < cpus - 0.5:  # until the scheduler sees them
            assert time.monotonic() < deadline
        loaded = hardware.choose_threads("auto")
        assert loaded.threads < cpus and "busy with other processes" in loaded.reason
        assert hardware.choose_threads("auto", load_aware=False).threads == cpus
    finally:
        for p in busy:
            p.kill()
            p.wait()


def test_device_rule_and_cpu_peak_estimate() -> None:
    import torch

    assert hardware.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert hardware.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(hardware.ConfigError, match=r"train\.device = 'cuda'"):
            hardware.resolve_device("cuda", key="train.device")
    peak, source = hardware.peak_tflops("cpu", threads=os.cpu_count() or 1, bf16=False)
    if peak is not None:  # /proc/cpuinfo names a clock: threads x MHz x FLOP per cycle
        assert 0.01 < peak < 100 and "CPU estimate" in source
