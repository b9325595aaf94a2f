"""Live metrics: the training loop's gauges reach Ray's Prometheus endpoint while a trial trains."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from trainer.config import TrialConfig
from trainer.data import input_spec
from trainer.live_metrics import GAUGES, LiveMetrics, expert_shares
from trainer.models import build_model
from trainer.report import LocalReporter

TRIAL = {
    "model": {"backbone": "vit_mini", "placement": "last2", "moe": {"experts": 4, "top_k": 2}},
    "data": {"train_samples": 128},
    "recipe": {"epochs": 1, "batch_size": 32, "lr": 0.003},
}
EXPORT_TIMEOUT_S = 60


def test_expert_shares_are_each_moe_layers_token_split() -> None:
    trial = TrialConfig.model_validate(TRIAL)
    spec = input_spec(trial.data)
    model = build_model(trial.model, spec)
    model(torch.randn(8, spec.in_chans, spec.img_size, spec.img_size))
    shares = expert_shares(model)
    assert list(shares) == ["block3", "block5"]  # vit_mini's Last 2, named as in routing.npz
    for split in shares.values():
        assert len(split) == 4 and sum(split) == pytest.approx(1.0) and min(split) >= 0


@pytest.mark.ray
def test_training_publishes_gauges_to_rays_metrics_endpoint(local_ray: None, tmp_path: Path) -> None:
    import ray

    class PublishingReporter(LocalReporter):
        """A standalone run's reporter, with Ray's gauges as a trial under Ray Train has them."""

        def live_metrics(self, trial: TrialConfig) -> LiveMetrics:
            return LiveMetrics(trial.trial_hash, "ViT-Mini-4 Last 2 Top 2 s0", interval_s=0.0)

    def train_publishing(folder: str) -> str:
        # Defined here, so Ray ships it by value: the worker cannot import this test module.
        from trainer.loop import train

        trial = TrialConfig.model_validate(TRIAL)
        train(trial, PublishingReporter(Path(folder)))
        return trial.trial_hash

    trial_hash = ray.get(ray.remote(train_publishing).remote(str(tmp_path)))
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = {f"ray_sweetspot_{name}" for name in GAUGES} | {"ray_sweetspot_expert_load"}
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    found: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        lines = [line for line in text.splitlines() if f'trial="{trial_hash[:12]}"' in line]
        found = {name: [line for line in lines if line.startswith(name + "{")] for name in wanted}
        if all(found.values()):
            break
        time.sleep(1)
    assert all(found.values()), f"not exported: {sorted(n for n, v in found.items() if not v)}"
    assert found["ray_sweetspot_epoch"][0].endswith(" 1.0")
    assert all('trial_name="ViT-Mini-4 Last 2 Top 2 s0"' in line for line in found["ray_sweetspot_images_per_s"])
    # One series per MoE layer and expert; each layer's shares sum to 1.
    loads = found["ray_sweetspot_expert_load"]
    assert len(loads) == 2 * 4
    for layer in ("block3", "block5"):
        shares = [float(line.rsplit(" ", 1)[1]) for line in loads if f'layer="{layer}"' in line]
        assert sum(shares) == pytest.approx(1.0, abs=1e-6)


def test_the_grafana_dashboard_plots_every_gauge_the_trainer_exports() -> None:
    dashboard = json.loads((Path(__file__).parents[1] / "dashboards" / "grafana" / "sweetspot.json").read_text())
    plotted = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"ray_sweetspot_\w+", target["expr"])
    }
    assert plotted == {f"ray_sweetspot_{name}" for name in GAUGES} | {"ray_sweetspot_expert_load"}
    # Its trial picker lists the trials that report an epoch, by the name the gauges are tagged with.
    (trial,) = [v for v in dashboard["templating"]["list"] if v["name"] == "trial"]
    assert trial["definition"] == "label_values(ray_sweetspot_epoch, trial_name)"
    assert all('trial_name=~"$trial"' in t["expr"] for p in dashboard["panels"] for t in p["targets"])
