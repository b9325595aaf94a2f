"""Shared fixtures: one local Ray for the whole test session (starting one costs seconds)."""

from __future__ import annotations

import os
from collections.abc import Iterator

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
