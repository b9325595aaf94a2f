"""Study expansion: grid × cases × seeds, exclusions, dense collapse, stable hashes, paper-style names."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.expand import Trial, expand, trial_name
from orchestrator.source import StudyError
from orchestrator.spec import load_study, resolve_axis
from trainer.config import TrialConfig


def study(tmp_path: Path, text: str) -> list[Trial]:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    spec, source = load_study(path)
    return expand(spec, source)


def test_grid_is_a_cartesian_product_times_seeds(tmp_path: Path) -> None:
    trials = study(tmp_path, "name: s\ngrid: {experts: [4, 8], top_k: [1, 2]}\nseeds: [0, 1, 2]\n")
    assert len(trials) == 2 * 2 * 3
    assert [t.index for t in trials] == list(range(12))
    assert {(t.config.model.moe.experts, t.config.model.moe.top_k, t.seed) for t in trials} == {
        (e, k, s) for e in (4, 8) for k in (1, 2) for s in (0, 1, 2)
    }


def test_dense_baselines_collapse_to_one_trial_per_seed(tmp_path: Path) -> None:
    trials = study(tmp_path, "name: s\ngrid: {placement: [none, last2], experts: [4, 8, 16]}\nseeds: [0, 1]\n")
    dense = [t for t in trials if t.config.model.is_dense]
    assert len(dense) == 2 and {t.seed for t in dense} == {0, 1}
    assert len(trials) == 2 + 3 * 2
    assert all(t.name == "ViT-Mini" for t in dense)
    assert dense[0].axes == {"placement": "none", "experts": None}


def test_cases_are_crossed_with_the_grid(tmp_path: Path) -> None:
    trials = study(
        tmp_path,
        "name: s\n"
        "grid: {experts: [4, 8]}\n"
        "cases:\n  - {backbone: vit_s, placement: every2}\n  - {backbone: vit_mini, placement: last2}\n",
    )
    assert [t.name for t in trials] == [
        "ViT-S-4 Every 2 Top 2",
        "ViT-S-8 Every 2 Top 2",
        "ViT-Mini-4 Last 2 Top 2",
        "ViT-Mini-8 Last 2 Top 2",
    ]


def test_exclude_drops_matching_combinations_before_validation(tmp_path: Path) -> None:
    # top_k 4 with 2 experts is invalid; excluding it makes the study valid.
    trials = study(
        tmp_path,
        "name: s\ngrid: {experts: [2, 8], top_k: [1, 4]}\nexclude:\n  - {experts: 2, top_k: [4]}\n",
    )
    assert {(t.config.model.moe.experts, t.config.model.moe.top_k) for t in trials} == {(2, 1), (8, 1), (8, 4)}


def test_invalid_combination_is_reported_at_the_grid_value_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(StudyError) as caught:
        study(tmp_path, "name: s\ngrid:\n  experts: [2, 8]\n  top_k: [1, 4]\n")
    (problem,) = caught.value.problems
    assert (problem.line, problem.field) == (4, "grid.top_k[1]")
    assert "top_k (4) must be <= experts (2)" in problem.reason
    assert "exclude" in problem.reason


def test_varied_axes_the_name_does_not_spell_out_are_appended(tmp_path: Path) -> None:
    trials = study(tmp_path, "name: s\ngrid: {placement: [none, last2], mlp_ratio: [2, 4]}\n")
    assert [t.name for t in trials] == [
        "ViT-Mini",
        "ViT-Mini-8 Last 2 Top 2, mlp_ratio=2",
        "ViT-Mini-8 Last 2 Top 2, mlp_ratio=4",
    ]


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ({"backbone": "vit_s", "placement": "every2", "moe": {"experts": 8, "top_k": 2}}, "ViT-S-8 Every 2 Top 2"),
        ({"backbone": "vit_b", "placement": "last2", "moe": {"experts": 4, "top_k": 1}}, "ViT-B-4 Last 2 Top 1"),
        ({"backbone": "vit_s", "placement": "none"}, "ViT-S"),
        ({"backbone": "vit_s", "placement": "last:3"}, "ViT-S-8 Last 3 blocks Top 2"),
        ({"backbone": "vit_s", "placement": [3, 7]}, "ViT-S-8 Blocks 3,7 Top 2"),
    ],
)
def test_paper_style_names(model: dict, name: str) -> None:
    assert trial_name(TrialConfig.model_validate({"model": model})) == name


def test_trial_hash_is_stable_and_ignores_how_the_study_was_written(tmp_path: Path) -> None:
    short = study(tmp_path, "name: a\ngrid: {experts: [4]}\nresources: {workers: 2}\n")
    long = study(tmp_path, "name: b\nbase: {model: {moe: {experts: 4}}}\ntracking: {experiment: other}\n")
    assert short[0].hash == long[0].hash
    assert len(short[0].hash) == 64


def test_trial_hash_is_pinned_so_stored_studies_keep_their_finished_trials() -> None:
    # If this fails, every trial already FINISHED in users' MLflow stores would be re-run.
    # Adding a field with a backward-compatible default must not change it.
    assert TrialConfig().trial_hash == "67d6291b301412df4a6ca7808aeafac9d0587b06ece3c68e72bab0157cd9d52c"
    explicit_default = TrialConfig.model_validate({"model": {"moe": {"experts": 8, "mlp_ratio": 4}}})
    assert explicit_default.trial_hash == TrialConfig().trial_hash


def test_trial_hash_changes_with_any_result_bearing_field() -> None:
    base = TrialConfig()
    changed = [
        TrialConfig.model_validate({"seed": 1}),
        TrialConfig.model_validate({"recipe": {"lr": 0.01}}),
        TrialConfig.model_validate({"model": {"moe": {"capacity_factor": 2.0}}}),
        TrialConfig.model_validate({"data": {"train_samples": 100}}),
    ]
    assert len({base.trial_hash, *(c.trial_hash for c in changed)}) == 5


def test_axis_short_names_and_dotted_paths() -> None:
    assert resolve_axis("experts") == ("model", "moe", "experts")
    assert resolve_axis("model.moe.experts") == ("model", "moe", "experts")
    assert resolve_axis("placement") == ("model", "placement")
    assert resolve_axis("lr") == ("recipe", "lr")
    with pytest.raises(ValueError, match="did you mean 'experts'"):
        resolve_axis("expert")


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ({"backbone": "convnext_t", "placement": "last2", "moe": {"experts": 4, "top_k": 1}}, "ConvNeXt-T-4 Last 2 Top 1"),
        ({"backbone": "convnext_s_iso", "placement": "last2", "moe": {"top_k": 1}}, "ConvNeXt-S-8 (iso.) Last 2 Top 1"),
        ({"backbone": "convnext_b_iso", "placement": "none"}, "ConvNeXt-B (iso.)"),
        ({"placement": "last2", "moe": {"router": "soft"}}, "ViT-Mini-8 Last 2 Soft"),
        ({"placement": "every2", "moe": {"router": "expert_choice"}}, "ViT-Mini-8 Every 2 Expert Choice"),
    ],
)
def test_trial_names_follow_the_paper(model: dict[str, object], name: str) -> None:
    assert trial_name(TrialConfig.model_validate({"model": model})) == name


def test_only_axes_needed_to_tell_trials_apart_are_appended(tmp_path: Path) -> None:
    trials = study(
        tmp_path,
        "name: s\ncases:\n"
        "  - {backbone: vit_s, placement: none, drop_path: 0.1}\n"
        "  - {backbone: vit_b, placement: none, drop_path: 0.2}\n"
        "  - {backbone: vit_b, placement: every2, drop_path: 0.2, mlp_ratio: 2}\n"
        "  - {backbone: vit_b, placement: every2, drop_path: 0.2, mlp_ratio: 4}\n"
        "seeds: [0, 1]\n",
    )
    assert [t.name for t in trials[::2]] == [
        "ViT-S",
        "ViT-B",
        "ViT-B-8 Every 2 Top 2, mlp_ratio=2",
        "ViT-B-8 Every 2 Top 2, mlp_ratio=4",
    ]
