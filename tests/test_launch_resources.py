"""Resource checks before launch: a trial that can never fit is a clear error, not PENDING forever."""

from __future__ import annotations

import pytest

from orchestrator.launch import ResourceError, check_fits
from orchestrator.spec import ResourcesSpec


def test_two_half_cpu_workers_fit_once_on_two_cpus() -> None:
    assert check_fits(ResourcesSpec(workers=2, cpus_per_worker=0.5), {"CPU": 2.0}) == 1


def test_concurrency_is_what_the_cluster_holds() -> None:
    assert check_fits(ResourcesSpec(workers=1, cpus_per_worker=0.5), {"CPU": 2.0}) == 3
    assert check_fits(ResourcesSpec(workers=2, cpus_per_worker=1, gpus_per_worker=1), {"CPU": 64, "GPU": 8}) == 4


def test_trial_driver_overhead_counts_so_full_cpu_workers_do_not_hang() -> None:
    # 2 workers × 1 CPU + the trial driver's share exceed 2 CPUs: Ray would wait forever.
    with pytest.raises(ResourceError, match="needs 2.01 CPUs and 0 GPUs .* has 2 CPUs"):
        check_fits(ResourcesSpec(workers=2, cpus_per_worker=1), {"CPU": 2.0})


def test_gpu_trial_on_a_cpu_cluster_is_refused() -> None:
    with pytest.raises(ResourceError, match="1 GPUs"):
        check_fits(ResourcesSpec(workers=1, cpus_per_worker=1, gpus_per_worker=1), {"CPU": 16.0})
