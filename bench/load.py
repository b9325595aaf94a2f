"""Load: a synthetic study of many short trials through ``sweetspot run``, with bounded concurrency.

The study is ``--trials`` seeds of one tiny configuration (MoE ViT-Mini, a few hundred embedded
MNIST digits, 1 epoch, 1 worker per trial: a few seconds of training each), run with
``resources.max_concurrent_trials = --concurrency`` and each worker's CPUs sized so that exactly
that many trials fit the local Ray at once. It runs through the real CLI in a subprocess, so the
wall time is everything a user pays: Python and Ray start-up, the MLflow store, every trial's
scheduling, the final table.

Afterwards it checks what a week-long study relies on (:func:`check_store`, shared with
``tests/test_load.py``):

- every expanded trial hash has exactly one MLflow child run, FINISHED, with one point per
  epoch of its per-epoch metrics, and nothing else is in the experiment but the study's run;
- ``PRAGMA integrity_check`` of the sqlite store answers ``ok``;
- the CLI's output and Ray's session logs never say "database is locked";
- no more than ``--concurrency`` trials were open in MLflow at once (and that many were).

and reports the wall time, trials per minute and the per-trial overhead: from the trial's
start (its MLflow run's start, when Tune launched it) to its first training step, plus from the
end of its training (the trainer's ``SWEETSPOT_TIMELINE``) to its run FINISHED.

Reproduce, from the repository root (on 2 idle cores: about 2.5 trials a minute, so 100 trials
take about 40 minutes)::

    python -m bench.load --trials 10 --concurrency 2
    python -m bench.load --trials 100 --concurrency 2 --json load.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from bench.orchestration import TrialTiming, _timeline
from orchestrator.expand import Trial, expand
from orchestrator.spec import StudySpec, load_study
from orchestrator.tags import TAG_HASH, TAG_KIND
from orchestrator.trial import TRIAL_DRIVER_CPUS
from trainer.loop import TIMELINE_ENV

STUDY = """
name: bench-load
description: synthetic load study, {trials} trials of a few seconds each, {concurrency} at a time
base:
  model: {{backbone: vit_mini, moe: {{top_k: 1, capacity_factor: 2.0}}}}
  data: {{train_samples: {samples}}}
  recipe: {{epochs: {epochs}, batch_size: 64, lr: 0.003}}
grid:
  experts: [2]
cases: [{{placement: last2}}]
seeds: {seeds}
max_failures: 0
resources: {{workers: 1, cpus_per_worker: {cpus}, max_concurrent_trials: {concurrency}}}
output: {output}
"""

# Metrics the trainer reports after every epoch: each must have exactly one point per epoch.
EPOCH_METRICS = ("train_loss", "val_top1")
LOCKED = "database is locked"
# Unix sockets live under Ray's temp dir and their paths are limited to 107 bytes.
_RAY_TMP_MAX = 40


@dataclass
class LoadReport:
    """What the MLflow store holds after a study, against the trials it expanded to."""

    trials: int  # expanded trials
    runs: int = 0  # trial child runs in the experiment
    finished: int = 0
    missing: list[str] = field(default_factory=list)  # trial hashes without a run
    duplicates: dict[str, int] = field(default_factory=dict)  # hash → runs, where more than one
    unexpected: list[str] = field(default_factory=list)  # runs of no expanded trial (hash or run id)
    not_finished: dict[str, str] = field(default_factory=dict)  # hash → status
    bad_epochs: dict[str, str] = field(default_factory=dict)  # hash → what is wrong with its metrics
    study_runs: list[str] = field(default_factory=list)  # statuses of the study's parent runs
    integrity: str | None = None  # PRAGMA integrity_check; None when the store is not sqlite
    # Each trial's run: (start, end) in seconds since the epoch (end None while not terminated).
    intervals: dict[str, tuple[float, float | None]] = field(default_factory=dict)

    @property
    def max_overlap(self) -> int:
        return max_overlap(self.intervals.values())

    def problems(self) -> list[str]:
        found = []
        if self.missing:
            found.append(f"{len(self.missing)} trials have no MLflow run: {_some(self.missing)}")
        if self.duplicates:
            found.append(f"{len(self.duplicates)} trials have several runs: {_some(self.duplicates)}")
        if self.unexpected:
            found.append(
                f"{len(self.unexpected)} runs belong to no trial of the study: {_some(self.unexpected)}"
            )
        if self.not_finished:
            found.append(f"{len(self.not_finished)} runs are not FINISHED: {_some(self.not_finished)}")
        if self.bad_epochs:
            found.append(f"{len(self.bad_epochs)} runs lack per-epoch metrics: {_some(self.bad_epochs)}")
        if self.study_runs != ["FINISHED"]:
            found.append(f"the study's parent runs are {self.study_runs}, not one FINISHED run")
        if self.integrity not in (None, "ok"):
            found.append(f"sqlite integrity_check: {self.integrity}")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()


def all_runs(client: MlflowClient, experiment_id: str, page_size: int = 1000) -> list[Run]:
    """Every run of the experiment, page by page (``search_runs`` returns one page)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=page_size, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def check_store(
    spec: StudySpec, trials: list[Trial], client: MlflowClient, *, page_size: int = 1000
) -> LoadReport:
    """Check the study's MLflow experiment against its expanded ``trials`` (see the module doc).

    Reads MLflow directly (not through :class:`orchestrator.tracking.StudyStore`, which is what
    is being checked): one paginated search, and one metric history per run and epoch metric.
    """
    report = LoadReport(trials=len(trials))
    experiment = client.get_experiment_by_name(spec.experiment_name)
    if experiment is None:
        report.missing = [t.hash for t in trials]
        report.integrity = _integrity(spec.tracking_uri)
        return report
    expected = {t.hash: t for t in trials}
    by_hash: dict[str, list[Run]] = {}
    for run in all_runs(client, experiment.experiment_id, page_size):
        kind = run.data.tags.get(TAG_KIND)
        if kind == "study":
            report.study_runs.append(run.info.status)
            continue
        trial_hash = run.data.tags.get(TAG_HASH)
        if kind != "trial" or trial_hash not in expected:
            report.unexpected.append(trial_hash or run.info.run_id)
            continue
        by_hash.setdefault(trial_hash, []).append(run)
    report.runs = sum(len(runs) for runs in by_hash.values())
    report.missing = [h for h in expected if h not in by_hash]
    report.duplicates = {h: len(runs) for h, runs in by_hash.items() if len(runs) > 1}
    for trial_hash, runs in by_hash.items():
        for run in runs:
            if run.info.status == "FINISHED":
                report.finished += 1
            else:
                report.not_finished[trial_hash] = run.info.status
            end = run.info.end_time / 1000 if run.info.end_time else None
            report.intervals[trial_hash] = (run.info.start_time / 1000, end)
            wrong = _epoch_problem(client, run, expected[trial_hash].config.recipe.epochs)
            if wrong:
                report.bad_epochs[trial_hash] = wrong
    report.integrity = _integrity(spec.tracking_uri)
    return report


def _epoch_problem(client: MlflowClient, run: Run, epochs: int) -> str | None:
    for metric in EPOCH_METRICS:
        steps = sorted(point.step for point in client.get_metric_history(run.info.run_id, metric))
        if steps != list(range(1, epochs + 1)):
            return f"{metric} at epochs {steps}, expected 1..{epochs} once each"
    return None


def _integrity(uri: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.is_file():
        return f"no database at {path}"
    # Read-only: the check must not create or change anything.
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as db:
        rows = db.execute("PRAGMA integrity_check").fetchall()
    return "; ".join(str(row[0]) for row in rows)


def max_overlap(intervals: Iterable[tuple[float, float | None]]) -> int:
    """The most intervals open at one instant (one ending as another starts does not overlap)."""
    events = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end if end is not None else float("inf"), -1))
    most = now = 0
    for _, step in sorted(events):  # at equal times the end (-1) sorts before the start (+1)
        now += step
        most = max(most, now)
    return most


def _span(intervals: Iterable[tuple[float, float | None]]) -> float:
    """Seconds from the first trial's start to the last one's end (0 without a finished trial)."""
    ended = [(start, end) for start, end in intervals if end is not None]
    return max(end for _, end in ended) - min(start for start, _ in ended) if ended else 0.0


def _some(items: Iterable[Any] | dict[str, Any], shown: int = 3) -> str:
    entries = (
        [f"{k[:8]}={v}" for k, v in items.items()]
        if isinstance(items, dict)
        else [str(i)[:12] for i in items]
    )
    more = f" (+{len(entries) - shown} more)" if len(entries) > shown else ""
    return ", ".join(entries[:shown]) + more


def scan_logs(paths: Iterable[Path], needle: str = LOCKED, shown: int = 5) -> tuple[int, list[str]]:
    """How many lines of these files (folders: every file inside) contain ``needle``, and the first few."""
    count, first = 0, []
    files = (f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else []))
    for path in files:
        if not path.is_file() or path.is_symlink():
            continue
        with open(path, errors="replace") as text:
            for line in text:
                if needle in line.lower():
                    count += 1
                    if len(first) < shown:
                        first.append(f"{path.name}: {line.strip()[:200]}")
    return count, first


def cpus_per_worker(cluster_cpus: float, concurrency: int) -> float:
    """The largest CPU share (2 decimals) of a 1-worker trial such that ``concurrency`` of them,
    each with its trial driver's share, fit ``cluster_cpus`` at once."""
    share = int((cluster_cpus / concurrency - TRIAL_DRIVER_CPUS) * 100) / 100
    if share <= 0:
        raise SystemExit(f"{concurrency} trials at once do not fit {cluster_cpus:g} CPUs")
    return share


def trial_timings(intervals: dict[str, tuple[float, float | None]], timeline: Path) -> dict[str, TrialTiming]:
    """Each trial's seconds before its first step, training, and after training until FINISHED."""
    marks = _timeline(timeline) if timeline.is_file() else {}
    timings = {}
    for trial_hash, (start, end) in intervals.items():
        mark = marks.get(trial_hash, {})
        if end is None or "first_step" not in mark or "train_end" not in mark:
            continue
        timings[trial_hash] = TrialTiming(
            before=mark["first_step"] - start, training=mark["train_end"] - mark["first_step"], after=end - mark["train_end"]
        )  # fmt: skip
    return timings


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else values[0]


@dataclass
class LoadResult:
    trials: int
    concurrency: int
    cpus_per_worker: float
    exit_code: int
    wall_s: float
    store: LoadReport
    timings: dict[str, TrialTiming]
    locked_lines: int
    locked_examples: list[str]
    output_lines: int

    def problems(self) -> list[str]:
        found = [] if self.exit_code == 0 else [f"sweetspot run exited {self.exit_code}"]
        found += self.store.problems()
        if self.locked_lines:
            found.append(f"{self.locked_lines} log lines say {LOCKED!r}: {self.locked_examples}")
        if self.store.max_overlap > self.concurrency:
            found.append(
                f"{self.store.max_overlap} trials ran at once, above max_concurrent_trials {self.concurrency}"
            )
        if len(self.timings) < self.store.finished:
            found.append(f"the timeline has {len(self.timings)} of {self.store.finished} finished trials")
        return found

    def numbers(self) -> dict[str, float]:
        t = list(self.timings.values())
        parts = {part: [getattr(x, part) for x in t] for part in ("before", "training", "after", "overhead")}
        return {
            "wall_s": self.wall_s,
            "trials_per_min": 60 * self.trials / self.wall_s,
            **{f"{part}_mean_s": statistics.fmean(v) for part, v in parts.items() if v},
            **{f"{part}_p95_s": p95(v) for part, v in parts.items() if v},
            "training_sum_s": sum(parts["training"]),
            "outside_trials_s": self.wall_s - _span(self.store.intervals.values()),
            "max_overlap": self.store.max_overlap,
        }

    def markdown(self) -> str:
        n, s = self.numbers(), self.store
        shape = f"{self.trials} × 1 epoch, {self.concurrency} at a time (1 worker × {self.cpus_per_worker:g} CPU each)"
        rows = [
            ("trials, at once", shape),
            ("wall time (`sweetspot run`, end to end)", f"{n['wall_s']:.0f} s"),
            ("trials per minute", f"{n['trials_per_min']:.1f}"),
            ("· outside every trial (start-up, store, table)", f"{n['outside_trials_s']:.0f} s"),
        ]  # fmt: skip
        if self.timings:
            rows += [
                ("per-trial overhead, mean / p95", f"{n['overhead_mean_s']:.1f} s / {n['overhead_p95_s']:.1f} s"),
                ("· trial start → first step, mean / p95", f"{n['before_mean_s']:.1f} s / {n['before_p95_s']:.1f} s"),
                ("· training end → FINISHED, mean / p95", f"{n['after_mean_s']:.1f} s / {n['after_p95_s']:.1f} s"),
                ("training per trial, mean", f"{n['training_mean_s']:.1f} s"),
                ("Σ training / wall time", f"{n['training_sum_s'] / n['wall_s']:.2f} (of {self.concurrency} slots)"),
            ]  # fmt: skip
        rows += [
            ("most trials open at once (MLflow)", str(s.max_overlap)),
            ("MLflow child runs / FINISHED / duplicated / missing",
             f"{s.runs} / {s.finished} / {len(s.duplicates)} / {len(s.missing)}"),
            ("sqlite `PRAGMA integrity_check`", str(s.integrity)),
            (f'"{LOCKED}" in the logs', f"{self.locked_lines} lines"),
            ("`sweetspot run` exit code, output lines", f"{self.exit_code}, {self.output_lines}"),
        ]  # fmt: skip
        width = max(len(k) for k, _ in rows)
        lines = [f"| {'':<{width}} | result |", f"|{'-' * (width + 2)}|--------|"]
        return "\n".join(lines + [f"| {k:<{width}} | {v} |" for k, v in rows])


def run_load(
    trials: int, concurrency: int, folder: Path, *, samples: int, cpus: float | None = None
) -> LoadResult:
    """Write the synthetic study into ``folder``, run it with ``sweetspot run``, check it."""
    cpus = cpus or cpus_per_worker(os.cpu_count() or 1, concurrency)
    study = folder / "study.yaml"
    study.write_text(
        STUDY.format(trials=trials, concurrency=concurrency, samples=samples, epochs=1, seeds=list(range(trials)),
                     cpus=cpus, output=folder / "out")
    )  # fmt: skip
    spec, source = load_study(study)
    expanded = expand(spec, source)
    assert len(expanded) == trials, f"the study expanded to {len(expanded)} trials, not {trials}"
    timeline, log = folder / "timeline.jsonl", folder / "run.log"
    ray_tmp = (
        folder / "ray"
        if len(str(folder / "ray")) <= _RAY_TMP_MAX
        else Path(tempfile.mkdtemp(prefix="bl-ray-"))
    )
    env = {**os.environ, TIMELINE_ENV: str(timeline), "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)  # always a fresh local Ray, whatever this shell joined
    started = time.time()
    with open(log, "w") as output:
        process = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "run", str(study)], check=False, env=env, stdout=output, stderr=subprocess.STDOUT
        )  # fmt: skip
    wall = time.time() - started
    store = check_store(spec, expanded, MlflowClient(spec.tracking_uri))
    locked, examples = scan_logs([log, ray_tmp])
    if ray_tmp.parent != folder:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    with open(log, errors="replace") as text:
        output_lines = sum(1 for _ in text)
    return LoadResult(
        trials=trials, concurrency=concurrency, cpus_per_worker=cpus, exit_code=process.returncode, wall_s=wall,
        store=store, timings=trial_timings(store.intervals, timeline), locked_lines=locked, locked_examples=examples,
        output_lines=output_lines,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--trials", type=int, default=10, help="trials (seeds 0..N-1 of one tiny configuration)"
    )
    parser.add_argument("--concurrency", type=int, default=2, help="resources.max_concurrent_trials")
    parser.add_argument(
        "--train-samples", type=int, default=256, help="embedded MNIST training images per trial"
    )
    parser.add_argument(
        "--cpus-per-worker", type=float, help="default: what fits --concurrency trials on this machine"
    )
    parser.add_argument(
        "--out", type=Path, help="keep the study, its store and logs here (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        if any(args.out.iterdir()):
            parser.error(f"--out {args.out} is not empty (a second run would resume the first, not load it)")
        folder, cleanup = args.out.resolve(), None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="bench-load-")
        folder = Path(cleanup.name)
    try:
        result = run_load(
            args.trials, args.concurrency, folder, samples=args.train_samples, cpus=args.cpus_per_worker
        )
        if cleanup is None:
            print(f"study, MLflow store and logs: {folder}")
        elif result.problems():
            shutil.copy(folder / "run.log", Path("bench-load-run.log"))
            print("the run's output: bench-load-run.log")
    finally:
        if cleanup is not None:
            cleanup.cleanup()

    print(result.markdown())
    if args.json:
        numbers = {**result.numbers(), "trials": result.trials, "concurrency": result.concurrency,
                   "store": asdict(result.store) | {"intervals": None}, "problems": result.problems()}  # fmt: skip
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    problems = result.problems()
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
