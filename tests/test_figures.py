"""Paper-style figures (dashboards.figures): the numbers behind them (finished trials only, seeds
averaged, the Pareto front, the dense baseline of a heatmap) and the images themselves.

Pure tests build results frames and routing analyses by hand (a routing analysis from random top
experts, through the real file format); the ``ray`` tests draw every figure from the session's
real tiny study and its MLflow artifacts.
"""

from __future__ import annotations

import hashlib
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dashboards.figures import (
    DPI,
    average_seeds,
    experts_mlp_ratio_figure,
    fetch_routing,
    heatmap_panels,
    lower_is_better,
    pareto_figure,
    pareto_front,
    routing_figures,
    write_study_figures,
)
from trainer.analysis import (
    RoutingAnalysis,
    expert_counts,
    load_routing,
    save_routing,
    similarity,
    similarity_sums,
)

ROUTING_STEMS = ["class_experts", "expert_similarity", "experts_per_image", "patch_cdf"]


# ---- Helpers ------------------------------------------------------------------------------------------------


def trial_row(
    name: str, seed: int, top1: float, active: float, status: str = "FINISHED", **axes: object
) -> dict:
    """One row of ``orchestrator.results.collect``'s frame (a dense model: placement ``none``)."""
    dense = axes.get("placement") == "none"
    return {
        "name": name, "seed": seed, "hash": hashlib.sha256(f"{name} {seed}".encode()).hexdigest()[:12],
        "status": status, "epoch": 1, "backbone": axes.get("backbone", "vit_s"), "dense": dense,
        "params_total_m": active if dense else active * 1.5, "params_active_m": active, "gflops": active / 10,
        "val_top1": top1, "val_loss": 100 - top1, **{f"axis.{axis}": value for axis, value in axes.items()},
    }  # fmt: skip


def frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as ``collect`` frames them: axis columns keep the trials' own values (4, not 4.0; None)."""
    results = pd.DataFrame(rows)
    for column in [c for c in results.columns if c.startswith("axis.")]:
        results[column] = pd.Series([row.get(column) for row in rows], dtype=object)
    return results


def grid_study(backbones: dict[str, float]) -> pd.DataFrame:
    """placement (none, last2) × experts (4, 8) × mlp_ratio (1, 2) × backbone, two seeds each.

    Accuracy is backbone base + experts/4 + mlp_ratio, ±0.5 over the seeds; the dense model of
    each backbone scores its base + 1.
    """
    rows = []
    for backbone, base in backbones.items():
        for seed, jitter in ((0, -0.5), (1, 0.5)):
            rows.append(trial_row(backbone, seed, base + 1 + jitter, 20.0, placement="none", experts=None,
                                  mlp_ratio=None, backbone=backbone))  # fmt: skip
            for experts in (4, 8):
                for ratio in (1.0, 2.0):
                    name = f"{backbone}-{experts} Last 2, mlp_ratio={ratio:g}"
                    rows.append(trial_row(name, seed, base + experts / 4 + ratio + jitter, 10 + 5 * ratio,
                                          placement="last2", experts=experts, mlp_ratio=ratio,
                                          backbone=backbone))  # fmt: skip
    return frame(rows)


def synthetic_analysis(path: Path, experts: int = 4, layers: int = 2, grid: tuple[int, int] = (4, 4),
                       classes: int = 10, images: int = 200) -> RoutingAnalysis:  # fmt: skip
    """A routing analysis of random top experts (biased by position and class, as trained routers are),
    computed with trainer.analysis' own formulas and read back through save_routing / load_routing."""
    generator = torch.Generator().manual_seed(0)
    tokens = grid[0] * grid[1]
    labels = torch.arange(images) % classes
    arrays: dict[str, np.ndarray] = {"layers": np.array([f"block{2 * i + 1}" for i in range(layers)]),
                                     "images": np.asarray(images, dtype=np.int64)}  # fmt: skip
    for name in arrays["layers"]:
        bias = (torch.arange(tokens) % experts).unsqueeze(0) + labels.unsqueeze(1)
        top = (bias + torch.randint(0, 2, (images, tokens), generator=generator)) % experts
        counts = expert_counts(top, experts)
        class_counts = torch.zeros(classes, experts, dtype=torch.long).index_add_(0, labels, counts)
        histogram = torch.zeros(experts, tokens + 1, dtype=torch.long)
        for expert in range(experts):
            histogram[expert] = torch.bincount(counts[:, expert], minlength=tokens + 1)
        spatial = torch.stack([(top == e).double().mean(dim=0) for e in range(experts)]).view(experts, *grid)
        arrays |= {
            f"{name}/class_counts": class_counts.numpy(),
            f"{name}/similarity": similarity(*similarity_sums(counts)).numpy(),
            f"{name}/experts_per_image": np.asarray((counts > 0).sum().item() / images, dtype=np.float64),
            f"{name}/patch_histogram": histogram.numpy(),
            f"{name}/spatial_map": spatial.numpy(),
        }
    save_routing(path, arrays)
    return load_routing(path)


def assert_valid_figures(paths: list[Path]) -> None:
    """Each figure is a PNG and an SVG of the same size (PNG pixels = SVG points × DPI / 72), and the
    PNG is a real drawing: not blank, not one colour."""
    stems = {path.with_suffix("") for path in paths}
    assert sorted(paths) == sorted(
        p for stem in stems for p in (stem.with_suffix(".png"), stem.with_suffix(".svg"))
    )
    for stem in stems:
        with Image.open(stem.with_suffix(".png")) as image:
            image.verify()
        with Image.open(stem.with_suffix(".png")) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, f"{stem}.png is (almost) one colour"
        root = ET.parse(stem.with_suffix(".svg")).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        width_pt, height_pt = (float(root.attrib[key].removesuffix("pt")) for key in ("width", "height"))
        assert pixels.shape[:2] == (round(height_pt * DPI / 72), round(width_pt * DPI / 72)), stem
        assert min(pixels.shape[:2]) >= 300, f"{stem}.png is too small to read: {pixels.shape}"


# ---- Seeds, finished trials, dense models -----------------------------------------------------------------


def test_seeds_are_averaged_per_configuration_in_study_order_with_their_spread() -> None:
    results = frame([
        trial_row("B", 0, 70.0, 2.0, placement="last2"), trial_row("A", 0, 60.0, 1.0, placement="none"),
        trial_row("B", 1, 74.0, 2.0, placement="last2"), trial_row("A", 1, 62.0, 1.0, placement="none"),
        trial_row("B", 2, 72.0, 2.0, placement="last2"),
    ])  # fmt: skip
    configs = average_seeds(results, "val_top1")
    assert list(configs["name"]) == ["B", "A"]
    assert list(configs["val_top1"]) == [72.0, 61.0]
    assert configs["val_top1_std"].tolist() == pytest.approx([2.0, math.sqrt(2)])
    assert list(configs["seeds"]) == [3, 2]
    assert list(configs["dense"]) == [False, True]
    assert list(configs["axis.placement"]) == ["last2", "none"]


def test_only_finished_trials_count_and_a_configuration_without_one_has_no_row() -> None:
    results = frame([
        trial_row("A", 0, 60.0, 1.0), trial_row("A", 1, 99.0, 1.0, status="FAILED"),
        trial_row("A", 2, 99.0, 1.0, status="RUNNING"), trial_row("B", 0, 50.0, 1.0, status="NOT RUN"),
    ])  # fmt: skip
    configs = average_seeds(results, "val_top1")
    assert list(configs["name"]) == ["A"]
    assert configs.loc[0, "val_top1"] == 60.0 and configs.loc[0, "seeds"] == 1
    assert math.isnan(configs.loc[0, "val_top1_std"])  # one seed has no spread


def test_a_missing_metric_is_named_with_the_columns_there_are() -> None:
    with pytest.raises(ValueError, match="val_top5"):
        average_seeds(frame([trial_row("A", 0, 60.0, 1.0)]), "val_top5")


def test_losses_and_errors_are_minimised_accuracies_maximised() -> None:
    assert (
        lower_is_better("val_loss") and lower_is_better("train_loss") and lower_is_better("dropped_fraction")
    )
    assert not lower_is_better("val_top1") and not lower_is_better("images_per_s")


# ---- The Pareto front ---------------------------------------------------------------------------------------


def test_pareto_front_keeps_each_point_no_cheaper_point_beats() -> None:
    cost = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0]
    score = [50.0, 60.0, 55.0, 58.0, 70.0, 70.0]
    # 2.0/55 loses to 2.0/60 at the same cost, 3.0/58 to 2.0/60, 5.0/70 to 4.0/70 (a tie costs more).
    assert pareto_front(cost, score).tolist() == [True, True, False, False, True, False]


def test_pareto_front_of_a_loss_minimises_it() -> None:
    assert pareto_front([1.0, 2.0, 3.0], [0.9, 1.0, 0.5], maximize=False).tolist() == [True, False, True]


def test_identical_points_are_optimal_together_and_nan_points_never() -> None:
    cost = [1.0, 1.0, math.nan, 2.0, 0.5]
    score = [60.0, 60.0, 99.0, math.nan, 10.0]
    assert pareto_front(cost, score).tolist() == [True, True, False, False, True]


def test_pareto_front_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(2,\) and \(3,\)"):
        pareto_front([1.0, 2.0], [1.0, 2.0, 3.0])


def test_pareto_figure_of_a_study_with_two_backbones(tmp_path: Path) -> None:
    paths = pareto_figure(grid_study({"vit_s": 60.0, "convnext_t": 70.0}), tmp_path, "val_top1")
    assert [p.name for p in paths] == ["pareto.png", "pareto.svg"]
    assert_valid_figures(paths)


def test_nothing_is_drawn_without_a_finished_trial(tmp_path: Path) -> None:
    results = grid_study({"vit_s": 60.0}).assign(status="RUNNING")
    assert pareto_figure(results, tmp_path) == []
    assert experts_mlp_ratio_figure(results, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


# ---- Experts × mlp_ratio ------------------------------------------------------------------------------------


def test_heatmap_has_a_panel_per_backbone_with_its_own_dense_baseline() -> None:
    panels = heatmap_panels(grid_study({"vit_s": 60.0, "convnext_t": 70.0}), "val_top1")
    assert [panel.title for panel in panels] == ["backbone=vit_s", "backbone=convnext_t"]
    assert [panel.baseline for panel in panels] == [61.0, 71.0]
    vit = panels[0].grid
    assert list(vit.index) == [4.0, 8.0] and list(vit.columns) == [1.0, 2.0]
    # Seeds averaged (the ±0.5 cancels): base + experts / 4 + mlp_ratio.
    assert vit.to_numpy().tolist() == [[62.0, 63.0], [63.0, 64.0]]


def test_heatmap_cells_wait_for_a_finished_trial() -> None:
    results = grid_study({"vit_s": 60.0})
    unfinished = results["name"].str.startswith("vit_s-8") & (results["axis.mlp_ratio"] == 2.0)
    results.loc[unfinished, "status"] = "FAILED"
    (panel,) = heatmap_panels(results, "val_top1")
    assert panel.title == ""  # one backbone: nothing to tell panels apart
    assert math.isnan(panel.grid.loc[8.0, 2.0]) and panel.grid.loc[8.0, 1.0] == 63.0


def test_heatmap_is_skipped_for_a_study_without_experts_and_mlp_ratio_axes(tmp_path: Path) -> None:
    results = grid_study({"vit_s": 60.0}).drop(columns="axis.mlp_ratio")
    assert heatmap_panels(results) == []
    assert experts_mlp_ratio_figure(results, tmp_path) == []
    # Both axes present but one configuration each: one cell compares nothing.
    single = grid_study({"vit_s": 60.0}).query("`axis.experts` != 8 and `axis.mlp_ratio` != 2")
    assert heatmap_panels(single) == []


def test_heatmap_without_a_dense_baseline_and_of_a_loss(tmp_path: Path) -> None:
    results = grid_study({"vit_s": 60.0})
    moe_only = results[results["axis.placement"] != "none"]
    (panel,) = heatmap_panels(moe_only, "val_loss")
    assert panel.baseline is None
    assert_valid_figures(experts_mlp_ratio_figure(moe_only, tmp_path / "moe", "val_loss"))
    assert_valid_figures(experts_mlp_ratio_figure(results, tmp_path / "dense", "val_loss"))


def test_heatmap_figure_draws_every_panel(tmp_path: Path) -> None:
    paths = experts_mlp_ratio_figure(grid_study({"vit_s": 60.0, "convnext_t": 70.0}), tmp_path)
    assert [p.name for p in paths] == ["experts_mlp_ratio.png", "experts_mlp_ratio.svg"]
    assert_valid_figures(paths)


# ---- Routing figures from a synthetic analysis -------------------------------------------------------------


def test_routing_figures_of_every_layer(tmp_path: Path) -> None:
    analysis = synthetic_analysis(tmp_path / "routing.npz", experts=4, layers=2)
    paths = routing_figures(analysis, tmp_path / "figures", "ViT-S-4 Last 2, seed 0")
    stems = [*ROUTING_STEMS, "spatial_map_block1", "spatial_map_block3"]
    assert sorted(p.name for p in paths) == sorted(
        f"{stem}.{ext}" for stem in stems for ext in ("png", "svg")
    )
    assert_valid_figures(paths)


def test_routing_figures_scale_to_many_experts_and_a_large_grid(tmp_path: Path) -> None:
    analysis = synthetic_analysis(
        tmp_path / "routing.npz", experts=24, layers=1, grid=(14, 14), classes=200, images=1000
    )
    assert_valid_figures(routing_figures(analysis, tmp_path / "figures"))


def test_a_dense_trial_has_no_routing_figures(tmp_path: Path) -> None:
    assert routing_figures(RoutingAnalysis(images=0, layers=()), tmp_path) == []


def test_study_figures_name_routing_folders_by_label_and_title_them_by_trial(tmp_path: Path) -> None:
    results = grid_study({"vit_s": 60.0})
    moe = results[results["axis.placement"] != "none"].iloc[0]
    analysis = tmp_path / "routing.npz"
    synthetic_analysis(analysis, layers=1)
    paths = write_study_figures(
        results, {moe["hash"]: analysis, "a label/with spaces": analysis}, tmp_path / "out"
    )
    folders = {p.parent.relative_to(tmp_path / "out").as_posix() for p in paths}
    assert folders == {".", f"routing/{moe['hash']}", "routing/a_label_with_spaces"}
    svg = (tmp_path / "out" / "routing" / moe["hash"] / "patch_cdf.svg").read_text()
    assert moe["name"] in svg  # titled by the trial's name, not its hash


# ---- The real study -----------------------------------------------------------------------------------------


@pytest.mark.ray
def test_fetch_routing_downloads_the_finished_moe_trials_analyses(tiny_study, tmp_path: Path) -> None:
    moe = [trial for trial in tiny_study.trials if not trial.config.model.is_dense]
    assert len(moe) == 8  # 4 MoE configurations × 2 seeds; the dense ones have no routing
    every = fetch_routing(tiny_study.store, tiny_study.trials, tmp_path / "all", all_seeds=True)
    assert list(every) == [trial.short_hash for trial in moe]
    for label, path in every.items():
        assert path == tmp_path / "all" / label / "routing.npz"
        assert [layer.name for layer in load_routing(path).layers] == ["block3", "block5"]  # vit_mini, last2
    first = fetch_routing(tiny_study.store, tiny_study.trials, tmp_path / "first")
    assert list(first) == [trial.short_hash for trial in moe if trial.seed == 0]


@pytest.mark.ray
def test_every_figure_of_the_real_study(tiny_study, tmp_path: Path) -> None:
    from orchestrator.results import collect

    results = collect(tiny_study.trials, tiny_study.store, tiny_study.spec.table.metrics)
    routing = fetch_routing(tiny_study.store, tiny_study.trials, tmp_path / "routing")
    label, path = next(iter(routing.items()))
    paths = write_study_figures(results, {label: path}, tmp_path / "figures")
    names = {p.relative_to(tmp_path / "figures").with_suffix("").as_posix() for p in paths}
    routing_stems = [*ROUTING_STEMS, "spatial_map_block3", "spatial_map_block5"]
    assert names == {"pareto", "experts_mlp_ratio", *(f"routing/{label}/{stem}" for stem in routing_stems)}
    assert_valid_figures(paths)
    (panel,) = heatmap_panels(results, "val_top1")
    dense = results[results["axis.placement"] == "none"]
    assert panel.baseline == pytest.approx(dense["val_top1"].mean())
    assert panel.grid.shape == (2, 2) and panel.grid.notna().all().all()


@pytest.mark.ray
def test_figures_command_writes_every_figure_and_names_a_bad_metric(tiny_study, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["figures", str(tiny_study.path), "-o", str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    # Pareto, heatmap, and 6 routing figures for each of the 4 MoE configurations (first seed).
    assert f"wrote 26 figures (PNG and SVG) to {tmp_path / 'figs'}" in result.output
    assert_valid_figures([p for p in (tmp_path / "figs").rglob("*") if p.suffix in (".png", ".svg")])
    bad = runner.invoke(app, ["figures", str(tiny_study.path), "-o", str(tmp_path / "x"), "--metric", "nope"])
    assert bad.exit_code == 2 and "no finished trial logged 'nope'" in bad.output
