"""Load, the CI size of ``bench/load.py``: the session's ``tiny_study`` (10 trials of a few seconds,
2 at a time, through real Ray Tune, Ray Train and MLflow on sqlite) checked with the benchmark's
own :func:`bench.load.check_store`. The 100-trial run is the benchmark's (README, "Load")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.load import LOCKED, LoadReport, all_runs, check_store, max_overlap, scan_logs


@pytest.mark.ray
def test_every_trial_is_in_mlflow_exactly_once_finished_with_its_epochs_and_the_store_is_intact(
    tiny_study: Any,
) -> None:
    # A page size of 3 makes the check read the 11 runs (10 trials + the study) over 4 pages.
    report = check_store(tiny_study.spec, tiny_study.trials, tiny_study.store.client, page_size=3)
    assert report.problems() == []
    assert report.runs == report.finished == len(tiny_study.trials) == 10
    assert report.study_runs == ["FINISHED"]
    assert report.integrity == "ok"
    assert len(all_runs(tiny_study.store.client, tiny_study.store.experiment_id, page_size=3)) == 11


@pytest.mark.ray
def test_two_trials_ran_at_once_never_more(tiny_study: Any) -> None:
    assert tiny_study.spec.resources.max_concurrent_trials == 2
    report = check_store(tiny_study.spec, tiny_study.trials, tiny_study.store.client)
    assert all(end is not None and end > start for start, end in report.intervals.values())
    assert report.max_overlap == 2


# ---------------------------------------------------------------------------------------------
# The checks themselves (no Ray)


def test_overlap_counts_intervals_open_at_one_instant() -> None:
    assert max_overlap([]) == 0
    assert max_overlap([(0, 1), (1, 2), (2, 3)]) == 1  # one ends as the next starts
    assert max_overlap([(0, 10), (1, 2), (1.5, 3), (5, 6)]) == 3
    assert max_overlap([(0, None), (5, 6)]) == 2  # a run never ended is open for good


def test_a_report_names_each_kind_of_loss() -> None:
    report = LoadReport(
        trials=4,
        runs=4,
        finished=3,
        missing=["a" * 64],
        duplicates={"b" * 64: 2},
        not_finished={"c" * 64: "RUNNING"},
        bad_epochs={"d" * 64: "train_loss at epochs [1, 1], expected 1..1 once each"},
        study_runs=["FINISHED"],
        integrity="*** in database main ***\nPage 7 is never used",
    )
    problems = "\n".join(report.problems())
    assert not report.ok
    for text in ("1 trials have no MLflow run", "several runs: bbbbbbbb=2", "not FINISHED: cccccccc=RUNNING",
                 "lack per-epoch metrics", "Page 7 is never used"):  # fmt: skip
        assert text in problems
    assert LoadReport(trials=0, study_runs=["FINISHED"], integrity="ok").ok
    assert not LoadReport(trials=0, study_runs=["FINISHED", "FINISHED"]).ok


def test_log_scan_finds_database_is_locked_in_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "run.log").write_text("ok\n")
    (tmp_path / "logs" / "worker.err").write_text(
        "sqlite3.OperationalError: database is locked\nfine\n(Database is locked)\n"
    )
    count, first = scan_logs([tmp_path / "run.log", tmp_path / "logs", tmp_path / "absent"])
    assert count == 2 and first[0].startswith("worker.err: sqlite3.OperationalError")
    assert LOCKED == "database is locked"
