"""`sweetspot status`, the plan's State column and `sweetspot ui`, on a real MLflow sqlite store.

The trial runs are written the way the tracking callback writes them (``StudyStore``), one trial
per state, with epoch timestamps chosen so that the ETA can be checked against its formula.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import Metric
from typer.testing import CliRunner

from orchestrator.cli import app, experiment_url, ui_argv
from orchestrator.expand import Trial, expand
from orchestrator.spec import StudySpec, load_study
from orchestrator.status import StatusReader, TrialStatus, format_duration, seconds_per_epoch, study_eta
from orchestrator.tracking import StudyStore

STUDY = """
name: {name}
base:
  model:
    backbone: vit_mini
    moe: {{top_k: 1}}
  data: {{dataset: embedded_mnist, train_samples: 256}}
  recipe: {{epochs: 4, batch_size: 64}}
cases:
  - {{placement: none}}
  - {{placement: last2}}
grid:
  experts: {experts}
seeds: {seeds}
resources: {{max_concurrent_trials: 2}}
output: {output}
table:
  metrics: [val_top1, train_loss]
"""

TRACEBACK = 'Traceback (most recent call last):\n  File "loop.py", line 1\nValueError: the loss is NaN\n'
WIDE = {"COLUMNS": "160"}  # rich wraps tables to the terminal; CliRunner's is 80 columns by default
DENSE, MOE4, MOE8 = "ViT-Mini", "ViT-Mini-4 Last 2 Top 1", "ViT-Mini-8 Last 2 Top 1"


def write_study(directory: Path, name: str, experts: list[int], seeds: list[int]) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, experts=experts, seeds=seeds, output=directory / name))
    return path


def load(path: Path) -> tuple[StudySpec, list[Trial]]:
    spec, source = load_study(path)
    return spec, expand(spec, source)


def log_epochs(store: StudyStore, run_id: str, times_ms: dict[int, int], total: int = 4) -> None:
    """Epochs as the callback logs them (step = epoch, ``epochs_total`` every epoch), at chosen times."""
    metrics = []
    for epoch, ms in times_ms.items():
        values = {"train_loss": 2.0 / epoch, "val_top1": 50.0 + 10 * epoch, "epochs_total": total}
        metrics += [Metric(key, float(value), ms, epoch) for key, value in values.items()]
    store.client.log_batch(run_id, metrics=metrics)


@dataclass
class Study:
    path: Path
    spec: StudySpec
    trials: list[Trial]
    store: StudyStore
    starts: dict[str, int]  # "name seed" → the run's start time (ms)
    now: float  # the moment the tests read the status at (s)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """Six trials: dense s0 done, dense s1 running, 4-expert s0 failed, s1 partial, 8-expert s0/s1 new."""
    path = write_study(tmp_path_factory.mktemp("status"), "states", [4, 8], [0, 1])
    spec, trials = load(path)
    assert [(t.name, t.seed) for t in trials] == [
        (DENSE, 0), (DENSE, 1), (MOE4, 0), (MOE4, 1), (MOE8, 0), (MOE8, 1),
    ]  # fmt: skip
    store = StudyStore.open(spec)
    parent = store.study_run(spec)
    runs = {f"{t.name} {t.seed}": store.start_trial(t, parent) for t in trials[:4]}
    starts = {key: store.client.get_run(run_id).info.start_time for key, run_id in runs.items()}

    # Done: 4 epochs, 10 s apart.
    done = runs[f"{DENSE} 0"]
    log_epochs(store, done, {e: starts[f"{DENSE} 0"] + 5_000 + 10_000 * e for e in range(1, 5)})
    store.finish(done, "FINISHED")
    # Running: 2 of 4 epochs, 12 s apart (the first one after 20 s of start-up).
    start = starts[f"{DENSE} 1"]
    log_epochs(store, runs[f"{DENSE} 1"], {1: start + 20_000, 2: start + 32_000})
    # Failed before its first epoch, with a traceback.
    store.finish(runs[f"{MOE4} 0"], "FAILED", TRACEBACK)
    # Partial (interrupted): 1 of 4 epochs, 30 s after its start.
    log_epochs(store, runs[f"{MOE4} 1"], {1: starts[f"{MOE4} 1"] + 30_000})
    store.finish(runs[f"{MOE4} 1"], "KILLED")
    now = starts[f"{DENSE} 1"] / 1000 + 100
    return Study(path, spec, trials, store, starts, now)


def test_status_rows_have_each_trials_state_epoch_metrics_and_error(study: Study) -> None:
    result = StatusReader(study.spec, study.trials, study.store).read(now=study.now)
    rows = {(r.name, r.seed): r for r in result.trials}
    assert [r.state for r in result.trials] == ["done", "running", "failed", "partial", "new", "new"]
    assert [r.epoch for r in result.trials] == [4, 2, 0, 1, 0, 0]
    assert {r.epochs_total for r in result.trials} == {4}
    assert rows[DENSE, 0].metrics == {"val_top1": 90.0, "train_loss": 0.5}
    assert rows[DENSE, 1].metrics == {"val_top1": 70.0, "train_loss": 1.0}
    assert rows[MOE8, 0].metrics == {"val_top1": None, "train_loss": None} and rows[MOE8, 0].run_id is None
    assert rows[MOE4, 0].error == "ValueError: the loss is NaN"
    assert all(r.error is None for r in result.trials if r.state != "failed")
    assert [r.hash for r in result.trials] == [t.short_hash for t in study.trials]
    assert result.counts() == {"done": 1, "running": 1, "partial": 1, "failed": 1, "new": 2}
    assert not result.settled
    # Running: elapsed to now; the others to their end.
    assert rows[DENSE, 1].elapsed_s == pytest.approx(100.0)
    assert rows[DENSE, 0].elapsed_s is not None and rows[DENSE, 0].elapsed_s >= 0
    assert result.elapsed_s == pytest.approx(study.now - min(study.starts.values()) / 1000)


def test_eta_follows_the_documented_formula(study: Study) -> None:
    result = StatusReader(study.spec, study.trials, study.store).read(now=study.now)
    rows = {(r.name, r.seed): r for r in result.trials}
    # Seconds per epoch: first to last logged epoch over the epochs between; one epoch: from the start.
    assert rows[DENSE, 0].seconds_per_epoch == pytest.approx(10.0)
    assert rows[DENSE, 1].seconds_per_epoch == pytest.approx(12.0)
    assert rows[MOE4, 1].seconds_per_epoch == pytest.approx(30.0)
    assert rows[MOE4, 0].seconds_per_epoch is None
    # A running or partial trial: its seconds per epoch × its epochs left; the others have none.
    assert rows[DENSE, 1].eta_s == pytest.approx(12.0 * 2)
    assert rows[MOE4, 1].eta_s == pytest.approx(30.0 * 3)
    assert rows[DENSE, 0].eta_s is None and rows[MOE4, 0].eta_s is None and rows[MOE8, 0].eta_s is None
    # New trials: no seed of theirs ran, so the study's mean seconds per epoch × their 4 epochs.
    new = (10.0 + 12.0 + 30.0) / 3 * 4
    left = [24.0, 90.0, new, new]  # the failed trial is not run again
    assert result.at_once == 2  # resources.max_concurrent_trials
    assert result.eta_s == pytest.approx(max(sum(left) / 2, max(left)))


def row(name: str, state: str, epoch: int, rate: float | None, eta: float | None = None) -> TrialStatus:
    return TrialStatus(name, 0, "h", state, epoch, 10, {}, None, rate, eta)


def test_study_eta_prefers_the_configurations_own_seeds_and_waits_for_the_longest_trial() -> None:
    rows = [
        row("A", "done", 10, 5.0),
        row("B", "done", 10, 50.0),
        row("A", "new", 0, None),  # another seed of A: 10 epochs × 5 s, not the study's mean
        row("B", "running", 4, 60.0, eta=360.0),
    ]
    # No max_concurrent_trials: the trials running now (1) run at once.
    assert study_eta(rows, None) == (pytest.approx(50.0 + 360.0), 1)
    # Four at once would finish in 410 / 4 s, but not before the longest trial left (360 s).
    assert study_eta(rows, 4) == (pytest.approx(360.0), 4)
    assert study_eta([row("A", "done", 10, 5.0), row("B", "failed", 2, None)], None) == (0.0, 1)
    assert study_eta([row("A", "new", 0, None)], None) == (None, 1)  # nothing to go by yet


def test_seconds_per_epoch_and_durations() -> None:
    assert seconds_per_epoch({1: 1_000, 2: 3_000, 4: 9_000}, 0) == pytest.approx(8.0 / 3)
    assert seconds_per_epoch({2: 10_000}, 4_000) == pytest.approx(3.0)
    assert seconds_per_epoch({}, 0) is None
    durations = [format_duration(s) for s in (None, 45, 200, 7500, 97200)]
    assert durations == ["–", "45s", "3m 20s", "2h 05m", "1d 3h"]


def test_status_command_prints_every_trial_with_its_state(study: Study) -> None:
    result = CliRunner().invoke(app, ["status", str(study.path)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "1 done, 1 running, 1 partial, 1 failed, 2 new; elapsed" in result.output
    for name in (DENSE, MOE4, MOE8):
        assert name in result.output
    for state in ("done", "running", "partial", "failed", "new"):
        assert f" {state} " in result.output
    assert "2/4" in result.output and "Top-1 (%)" in result.output
    assert study.trials[0].short_hash in result.output
    assert f"failed {MOE4} seed 0: ValueError: the loss is NaN" in result.output
    # In an 80-column terminal the hashes make room for the names.
    narrow = CliRunner().invoke(app, ["status", str(study.path)], env={"COLUMNS": "80"})
    assert study.trials[0].short_hash not in narrow.output and "ViT-Mini " in narrow.output


def test_status_json_is_one_record_per_trial(study: Study) -> None:
    result = CliRunner().invoke(app, ["status", str(study.path), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["study"] == "states" and data["counts"]["new"] == 2 and data["at_once"] == 2
    assert [t["state"] for t in data["trials"]] == ["done", "running", "failed", "partial", "new", "new"]
    assert data["trials"][3]["eta_s"] == pytest.approx(90.0)
    assert data["trials"][2]["error"] == "ValueError: the loss is NaN"


def test_status_watch_stops_once_every_trial_is_done_or_failed(tmp_path: Path) -> None:
    path = write_study(tmp_path, "settled", [4], [0])
    spec, trials = load(path)
    store = StudyStore.open(spec)
    parent = store.study_run(spec)
    for trial, outcome in zip(trials, ["FINISHED", "FAILED"], strict=True):
        run_id = store.start_trial(trial, parent)
        store.log_epoch(run_id, {"train_loss": 1.0, "val_top1": 80.0, "epochs_total": 4}, 1)
        store.finish(run_id, outcome, TRACEBACK if outcome == "FAILED" else None)
    result = CliRunner().invoke(app, ["status", str(path), "--watch", "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    assert "1 done, 0 running, 0 partial, 1 failed, 0 new" in result.output


def test_status_of_a_study_that_never_ran_creates_nothing(tmp_path: Path) -> None:
    path = write_study(tmp_path, "never", [4], [0])
    for command in (["status", str(path)], ["status", str(path), "--format", "json"], ["ui", str(path)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1, result.output
        assert "no results for study 'never' yet" in result.output
    assert not (tmp_path / "never").exists()  # neither mlflow.db nor its folder


def test_status_never_creates_an_experiment_in_an_existing_store(study: Study) -> None:
    other = study.path.parent / "other.yaml"
    other.write_text(STUDY.format(name="other", experts=[4], seeds=[0], output=study.spec.output_dir))
    result = CliRunner().invoke(app, ["status", str(other)])
    assert result.exit_code == 1 and "no results for study 'other' yet" in result.output
    assert study.store.client.get_experiment_by_name("other") is None


def test_plan_shows_each_configurations_state(study: Study) -> None:
    result = CliRunner().invoke(app, ["plan", str(study.path)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "┃ Seeds ┃ State " in result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    assert "1 done, 1 running" in lines[DENSE]
    assert "1 partial, 1 failed" in lines[MOE4]
    assert " new " in lines[MOE8]
    rows = json.loads(CliRunner().invoke(app, ["plan", str(study.path), "--format", "json"]).stdout)
    assert [r["state"] for r in rows] == ["done", "running", "failed", "partial", "new", "new"]
    csv = CliRunner().invoke(app, ["plan", str(study.path), "--format", "csv"]).stdout
    assert csv.splitlines()[0].split(",").count("state") == 1


def test_plan_of_a_study_that_never_ran_is_all_new_and_creates_nothing(tmp_path: Path) -> None:
    path = write_study(tmp_path, "fresh", [4], [0])
    rows = json.loads(CliRunner().invoke(app, ["plan", str(path), "--format", "json"]).stdout)
    assert [r["state"] for r in rows] == ["new", "new"]
    table = CliRunner().invoke(app, ["plan", str(path)], env=WIDE)
    assert table.exit_code == 0 and "Seeds" in table.output and "State" not in table.output
    assert not (tmp_path / "fresh").exists()


def test_ui_runs_mlflow_on_the_study_store_and_prints_the_experiment_url(study: Study) -> None:
    uri = study.spec.tracking_uri
    argv = ui_argv(uri, "127.0.0.1", 5001)
    beside = Path(sys.executable).parent / "mlflow"
    assert argv == [str(beside) if beside.is_file() else "mlflow", "ui", "--backend-store-uri", uri,
                    "--host", "127.0.0.1", "--port", "5001"]  # fmt: skip
    experiment_id = study.store.experiment_id
    assert experiment_url("127.0.0.1", 5001, experiment_id) == f"http://127.0.0.1:5001/#/experiments/{experiment_id}"
    assert experiment_url("0.0.0.0", 80, "7") == "http://127.0.0.1:80/#/experiments/7"  # reached locally
