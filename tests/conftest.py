"""Shared fixtures: one local Ray for the whole test session (starting one costs seconds)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Quiet, deterministic Tune output in tests; set before ray.tune is imported anywhere.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


TINY_STUDY = """
name: tiny
description: the smallest study with every kind of row a result table has
base:
  model:
    backbone: vit_mini
    moe: {{top_k: 1, capacity_factor: 2.0}}
  data: {{train_samples: 256}}
  recipe: {{epochs: 1, batch_size: 64, lr: 0.003}}
grid:
  placement: [none, last2]   # the dense baseline collapses to one configuration
  experts: [2, 4]
  mlp_ratio: [1, 2]
seeds: [0, 1]
max_failures: 0
resources:
  workers: 1
  cpus_per_worker: 0.5     # 0.51 CPU a trial with its driver: 3 would fit the session's 2 CPUs ...
  max_concurrent_trials: 2 # ... tests/test_load.py checks that 2 ran at once, never more
output: {output}
table:
  metrics: [val_top1, val_top5, images_per_s]
"""


@dataclass(frozen=True)
class TinyStudy:
    """A finished real study: 5 configurations (1 dense) × 2 seeds, 1 epoch each, 2 trials at a time,
    in MLflow."""

    path: Path
    spec: Any
    trials: list[Any]
    store: Any


@pytest.fixture(scope="session")
def tiny_study(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> TinyStudy:
    """Trained once per test session through real Ray Tune, Ray Train and MLflow (sqlite)."""
    from orchestrator.expand import expand
    from orchestrator.launch import run_study
    from orchestrator.spec import load_study
    from orchestrator.tracking import StudyStore

    folder = tmp_path_factory.mktemp("tiny")
    path = folder / "tiny.yaml"
    path.write_text(TINY_STUDY.format(output=folder / "out"))
    spec, source = load_study(path)
    trials = expand(spec, source)
    store = StudyStore.open(spec)
    outcome = run_study(spec, trials, store)
    assert outcome.ok and len(outcome.finished) == len(trials) == 10, outcome
    return TinyStudy(path, spec, trials, store)
