"""Resource checks before launch: a trial that can never fit is a clear error, not PENDING forever."""

from __future__ import annotations

import pytest

from orchestrator.launch import ResourceError, check_fits
from orchestrator.spec import ResourcesSpec


def test_two_half_cpu_workers_fit_once_on_two_cpus() -> None:
    assert check_fits(ResourcesSpec(workers=2, cpus_per_worker=0.5), [{"CPU": 2.0}]) == 1


def test_concurrency_is_what_the_cluster_holds() -> None:
    assert check_fits(ResourcesSpec(workers=1, cpus_per_worker=0.5), [{"CPU": 2.0}]) == 3
    assert check_fits(ResourcesSpec(workers=2, cpus_per_worker=1, gpus_per_worker=1), [{"CPU": 64, "GPU": 8}]) == 4


def test_trial_driver_overhead_counts_so_full_cpu_workers_do_not_hang() -> None:
    # 2 workers × 1 CPU + the trial driver's share exceed 2 CPUs: Ray would wait forever.
    with pytest.raises(ResourceError, match="needs 2.01 CPUs and 0 GPUs .* has 2 CPUs"):
        check_fits(ResourcesSpec(workers=2, cpus_per_worker=1), [{"CPU": 2.0}])


def test_gpu_trial_on_a_cpu_cluster_is_refused() -> None:
    with pytest.raises(ResourceError, match="1 GPUs"):
        check_fits(ResourcesSpec(workers=1, cpus_per_worker=1, gpus_per_worker=1), [{"CPU": 16.0}])


# Two 8-GPU nodes: 16 GPUs in all, but never more than 8 on one node.
NODES = [{"CPU": 32.0, "GPU": 8.0}, {"CPU": 32.0, "GPU": 8.0}]


def test_a_worker_must_fit_on_one_node_not_just_in_the_cluster_total() -> None:
    with pytest.raises(ResourceError, match=r"no node .* room for a worker \(12 CPU, 1 GPU\); its largest node has 8 CPUs and 1 GPUs"):
        check_fits(ResourcesSpec(workers=2, cpus_per_worker=12, gpus_per_worker=1), [{"CPU": 8.0, "GPU": 1.0}] * 4)
    assert check_fits(ResourcesSpec(workers=2, cpus_per_worker=12, gpus_per_worker=1), NODES) == 2


def test_strict_pack_needs_one_node_for_every_worker() -> None:
    sixteen = ResourcesSpec(workers=16, cpus_per_worker=1, gpus_per_worker=1, placement_strategy="STRICT_PACK")
    with pytest.raises(ResourceError, match="STRICT_PACK puts all 16 workers on one node"):
        check_fits(sixteen, NODES)
    assert check_fits(sixteen.model_copy(update={"placement_strategy": "PACK"}), NODES) == 1
    assert check_fits(sixteen.model_copy(update={"workers": 8}), NODES) == 2


def test_strict_spread_needs_a_node_per_worker() -> None:
    three = ResourcesSpec(workers=3, cpus_per_worker=1, gpus_per_worker=1, placement_strategy="STRICT_SPREAD")
    with pytest.raises(ResourceError, match="only 2 node\\(s\\) have room"):
        check_fits(three, NODES)
    assert check_fits(three.model_copy(update={"workers": 2}), NODES) == 8
