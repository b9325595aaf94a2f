"""What a study will cost before it runs: per trial parameters, FLOPs and training compute.

Models are built on the meta device (nothing allocated), once per distinct model and input
shape, so planning a ViT-B-8 Every 2 study takes seconds. ``measure`` also times inference of
each distinct model on this machine and turns it into an estimate of training hours.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.expand import Trial
from trainer.data import input_spec, train_size
from trainer.models.accounting import ModelCost, measure_throughput, model_cost

# A training step (forward + backward) costs about three forward passes.
TRAIN_FLOPS_PER_FORWARD = 3


@dataclass(frozen=True)
class TrialPlan:
    """One trial's cost.

    Attributes:
        train_pflop: ``3 × FLOPs/image × training images × epochs`` / 1e15 (multiply-adds, as
            the FLOPs column); None when this machine cannot see the dataset to count it.
        images_per_s: measured inference throughput of the model here (``measure`` only).
        train_hours: ``3 × images × epochs / images_per_s`` on one such device (``measure`` only).
    """

    trial: Trial
    cost: ModelCost
    train_pflop: float | None
    images_per_s: float | None = None
    train_hours: float | None = None

    def row(self) -> dict[str, Any]:
        """A flat JSON-able record (what ``plan --format json|csv`` prints)."""
        return {
            "name": self.trial.name,
            "seed": self.trial.seed,
            "hash": self.trial.hash,
            **asdict(self.cost),
            "gflops": self.cost.flops / 1e9,
            "train_pflop": self.train_pflop,
            "images_per_s": self.images_per_s,
            "train_hours": self.train_hours,
            "axes": self.trial.axes,
            "trial": self.trial.config.model_dump(mode="json"),
        }


def plan(trials: list[Trial], measure: bool = False, device: str = "cpu") -> list[TrialPlan]:
    costs: dict[str, ModelCost] = {}
    speeds: dict[str, float] = {}
    plans = []
    for trial in trials:
        config = trial.config
        inputs = input_spec(config.data)
        key = json.dumps([config.model.model_dump(mode="json"), asdict(inputs)], sort_keys=True)
        if key not in costs:
            costs[key] = model_cost(config.model, inputs)
        cost = costs[key]
        size = train_size(config.data)
        images = size * config.recipe.epochs if size is not None else None
        train_pflop = TRAIN_FLOPS_PER_FORWARD * cost.flops * images / 1e15 if images is not None else None
        images_per_s = train_hours = None
        if measure:
            if key not in speeds:
                speeds[key] = measure_throughput(config.model, inputs, device=device)
            images_per_s = speeds[key]
            if images is not None:
                train_hours = TRAIN_FLOPS_PER_FORWARD * images / images_per_s / 3600
        plans.append(TrialPlan(trial, cost, train_pflop, images_per_s, train_hours))
    return plans
