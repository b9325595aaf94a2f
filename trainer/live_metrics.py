"""Live training metrics for the Ray dashboard and Prometheus / Grafana, while an epoch runs.

MLflow gets one point per epoch; an ImageNet epoch is an hour. So rank 0 of a trial running under
Ray Train also sets ``ray.util.metrics`` gauges every few seconds: throughput, losses and the
routing statistics (dropped tokens, expert load balance), and each expert's share of the tokens per
MoE layer. Ray's metrics agent exports them to Prometheus with a ``ray_`` prefix
(``ray_sweetspot_images_per_s``), tagged by study trial; ``dashboards/grafana/sweetspot.json``
plots them.
"""

from __future__ import annotations

import time
from typing import Any

# Gauge name (after "sweetspot_") → what it is. Values are the running means since the epoch began.
GAUGES = {
    "images_per_s": "training images per second of the trial (all workers)",
    "train_loss": "task loss, running mean over the epoch",
    "aux_loss": "MoE auxiliary (load balancing) loss, running mean over the epoch",
    "dropped_fraction": "share of token-to-expert assignments over capacity, running mean",
    "expert_load_cv": "coefficient of variation of tokens per expert (0: balanced), running mean",
    "epoch": "epoch in progress (1-based)",
}
EXPERT_LOAD = "expert_load"  # per layer and expert: its share of the layer's kept tokens
TAGS = ("trial", "trial_name")
# How often rank 0 updates the gauges: Ray's agent exports every few seconds anyway.
INTERVAL_S = 5.0


class LiveMetrics:
    """Rank 0's gauges for one trial; ``update`` is cheap to call every step."""

    def __init__(self, trial_hash: str, trial_name: str, interval_s: float = INTERVAL_S) -> None:
        from ray.util.metrics import Gauge

        self.tags = {"trial": trial_hash[:12], "trial_name": trial_name}
        self.gauges = {name: Gauge(f"sweetspot_{name}", about, tag_keys=TAGS) for name, about in GAUGES.items()}
        self.expert_load = Gauge(
            f"sweetspot_{EXPERT_LOAD}",
            "share of an MoE layer's kept tokens that go to each expert (1/E when balanced)",
            tag_keys=(*TAGS, "layer", "expert"),
        )
        self.interval_s = interval_s
        self._last = 0.0

    def due(self) -> bool:
        """Whether an update is due (rank 0 only gathers the numbers then)."""
        return time.monotonic() - self._last >= self.interval_s

    def update(self, values: dict[str, float], expert_load: dict[str, list[float]] | None = None) -> None:
        """Set the gauges from ``values`` (keys of :data:`GAUGES`; others are ignored) and, per MoE
        layer, each expert's share of its tokens."""
        self._last = time.monotonic()
        for name, value in values.items():
            if name in self.gauges:
                self.gauges[name].set(float(value), tags=self.tags)
        for layer, shares in (expert_load or {}).items():
            for expert, share in enumerate(shares):
                self.expert_load.set(float(share), tags={**self.tags, "layer": layer, "expert": str(expert)})


def expert_shares(model: Any) -> dict[str, list[float]]:
    """Each MoE layer's last forward: every expert's share of the tokens it kept, by layer name
    (``block<i>``, as in the routing analysis)."""
    from trainer.analysis import named_moe_layers

    shares = {}
    for name, layer in named_moe_layers(model):
        stats = layer.last_stats
        if stats is None:
            continue
        tokens = stats["tokens_per_expert"].float()
        total = float(tokens.sum())
        shares[name] = (tokens / total).tolist() if total > 0 else [0.0] * tokens.numel()
    return shares
