"""What the platform costs per trial: the same trials through ``sweetspot run`` and bare ``torchrun``.

Both sides train the same trials of a small study one after another, with the trainer's
timeline (``SWEETSPOT_TIMELINE``) marking when each trial's training starts (its first step)
and ends (after its last epoch's evaluation and checkpoint). For each trial:

- ``torchrun``: process launch → first step, and training end → process exit;
- ``sweetspot``: the trial's start (the MLflow run's start, when Tune launched it) → first step,
  and training end → the MLflow run FINISHED.

Their sum is the per-trial overhead; training itself (first step → end) is the same work on
both sides. The whole study's wall time is compared too: ``sweetspot run`` (Ray start-up, the
MLflow store, the final table) against the torchrun launches back to back. The sides run one
after the other in this one process, on the same machine state.

Reproduce, from the repository root::

    python -m bench.orchestration                      # 3 trials, 1 worker each, 1 epoch
    python -m bench.orchestration --trials 5 --workers 2 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.expand import Trial, expand
from orchestrator.spec import load_study
from trainer.loop import TIMELINE_ENV

STUDY = """
name: bench-orchestration
base:
  model: {{backbone: vit_mini, moe: {{top_k: 1, capacity_factor: 2.0}}}}
  data: {{train_samples: {samples}}}
  recipe: {{epochs: {epochs}, batch_size: 64, lr: 0.003}}
grid:
  experts: {experts}
cases: [{{placement: last2}}]
max_failures: 0
resources: {{workers: {workers}, cpus_per_worker: {cpus}, max_concurrent_trials: 1}}
output: {output}
"""


@dataclass(frozen=True)
class TrialTiming:
    """One trial's seconds: before its first step, its training, and after its training ended."""

    before: float
    training: float
    after: float

    @property
    def overhead(self) -> float:
        return self.before + self.after


@dataclass(frozen=True)
class Side:
    name: str
    trials: list[TrialTiming]
    wall: float

    def mean(self, part: str) -> float:
        return statistics.fmean(getattr(t, part) for t in self.trials)


def _timeline(path: Path) -> dict[str, dict[str, float]]:
    """Rank 0's events by trial hash (the first ``first_step`` and the last ``train_end``)."""
    events: dict[str, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["rank"] != 0:
            continue
        marks = events.setdefault(record["trial"], {})
        if record["event"] == "first_step":
            marks.setdefault("first_step", record["time"])
        elif record["event"] == "train_end":
            marks["train_end"] = record["time"]
    return events


def run_torchrun(trials: list[Trial], workers: int, folder: Path) -> Side:
    timeline = folder / "torchrun.jsonl"
    env = {**os.environ, TIMELINE_ENV: str(timeline)}
    bounds = {}
    started = time.time()
    for trial in trials:
        config = folder / f"{trial.short_hash}.json"
        config.write_text(trial.config.model_dump_json())
        launch = time.time()
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
             "-m", "trainer", "--trial", str(config), "--out", str(folder / trial.short_hash)],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        bounds[trial.hash] = (launch, time.time())
    wall = time.time() - started
    marks = _timeline(timeline)
    timings = [
        TrialTiming(
            before=marks[t.hash]["first_step"] - bounds[t.hash][0],
            training=marks[t.hash]["train_end"] - marks[t.hash]["first_step"],
            after=bounds[t.hash][1] - marks[t.hash]["train_end"],
        )
        for t in trials
    ]
    return Side("torchrun", timings, wall)


def run_sweetspot(study: Path, trials: list[Trial], tracking_uri: str, folder: Path) -> Side:
    timeline = folder / "sweetspot.jsonl"
    started = time.time()
    subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(study)],
        env={**os.environ, TIMELINE_ENV: str(timeline)}, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    wall = time.time() - started
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("bench-orchestration")
    runs = {
        run.data.tags["sweetspot.trial_hash"]: run
        for run in client.search_runs([experiment.experiment_id])
        if run.data.tags.get("sweetspot.kind") == "trial"
    }
    marks = _timeline(timeline)
    timings = [
        TrialTiming(
            before=marks[t.hash]["first_step"] - runs[t.hash].info.start_time / 1000,
            training=marks[t.hash]["train_end"] - marks[t.hash]["first_step"],
            after=runs[t.hash].info.end_time / 1000 - marks[t.hash]["train_end"],
        )
        for t in trials
    ]
    return Side("sweetspot", timings, wall)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.orchestration", description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="trials (MoE ViT-Mini with 2, 4, 6, … experts)")
    parser.add_argument("--workers", type=int, default=1, help="DDP ranks per trial")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        folder = Path(tmp)
        study = folder / "study.yaml"
        study.write_text(
            STUDY.format(
                samples=args.train_samples, epochs=args.epochs, experts=list(range(2, 2 + 2 * args.trials, 2)),
                workers=args.workers, cpus=1 / args.workers if args.workers > 1 else 1, output=folder / "out",
            )
        )  # fmt: skip
        spec, source = load_study(study)
        trials = expand(spec, source)
        (folder / "torchrun").mkdir()
        bare = run_torchrun(trials, args.workers, folder / "torchrun")
        platform = run_sweetspot(study, trials, spec.tracking_uri, folder)

    print(f"{len(trials)} trials, {args.workers} worker(s) each, {args.epochs} epoch(s), run one at a time\n")
    print(f"{'seconds per trial (mean)':<34}{'torchrun':>10}{'sweetspot':>11}")
    for label, part in [
        ("start → first step", "before"),
        ("training (first step → end)", "training"),
        ("training end → finished", "after"),
        ("overhead (start + end)", "overhead"),
    ]:
        print(f"{label:<34}{bare.mean(part):>10.1f}{platform.mean(part):>11.1f}")
    extra = platform.mean("overhead") - bare.mean("overhead")
    print(f"\nplatform overhead per trial beyond torchrun: {extra:.1f} s "
          f"({platform.mean('overhead') / bare.mean('overhead'):.2f}x torchrun's)")  # fmt: skip
    print(f"whole study: torchrun {bare.wall:.1f} s, sweetspot run {platform.wall:.1f} s "
          f"({platform.wall / bare.wall:.2f}x)")  # fmt: skip
    if args.json:
        numbers = {side.name: {"wall_s": side.wall, "trials": [asdict(t) for t in side.trials]} for side in (bare, platform)}
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    main()
