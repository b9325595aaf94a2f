"""The terminal view of ``sweetspot run``: a line per trial event above one live progress bar.

The bar counts epochs, not trials: trials of a study differ in length, and a 300-epoch trial
must not move the bar as much as a 1-epoch one. Epochs a resumed trial already trained count
as done from its start; the epochs a trial will not train (stopped early, failed) are taken
off the total. The ETA is rich's, from the recent pace of epochs.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from orchestrator.expand import Trial
from orchestrator.launch import LaunchInfo
from orchestrator.redact import redact
from orchestrator.status import last_line

_EPOCH_METRICS = {"train_loss": "loss {:.3f}", "val_top1": "top-1 {:.1f}%", "images_per_s": "{:.0f} im/s"}


class StudyProgress:
    """Receives :func:`orchestrator.launch.run_study`'s events (``on_start``, ``on_event``,
    ``on_interrupt``) and shows them; use as a context manager around ``run_study``."""

    def __init__(self, console: Console, study: str) -> None:
        self.console = console
        self.study = study
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[trials]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task: Any = None
        self._epochs: dict[str, int] = {}  # epochs of each trial to run
        self._done_epochs: dict[str, int] = {}
        self._total = self._running = self._finished = self._failed = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live display (it gives the terminal its cursor back)."""
        if self._task is not None:
            self._progress.stop()

    def on_start(self, info: LaunchInfo) -> None:
        where = (
            "a local Ray" if info.address == "local" else f"the Ray cluster at {escape(redact(info.address))}"
        )
        gpus = f", {info.gpus:g} GPUs" if info.gpus else ""
        self.console.print(
            f"{len(info.trials)} trials to run on {where} ({info.cpus:g} CPUs{gpus}), "
            f"{info.concurrency} at a time"
        )
        if info.dashboard_url:
            self.console.print(f"Ray dashboard: {escape(redact(info.dashboard_url))}")
        elif info.address == "local":
            self.console.print("Ray dashboard: not started (`sweetspot run --dashboard` starts it)")
        self._epochs = {t.hash: t.config.recipe.epochs for t in info.trials}
        self._total = len(info.trials)
        self._task = self._progress.add_task(self.study, total=sum(self._epochs.values()), trials=self._counts())
        self._progress.start()

    def on_interrupt(self) -> None:
        self.console.print(
            "[yellow]interrupted[/yellow]: stopping the running trials (their checkpoints are kept); "
            "Ctrl-C again to quit at once"
        )

    def on_outage(self, message: str | None) -> None:
        if message is None:
            self.console.print("[green]MLflow is back[/green]: the results that waited are written")
        else:
            self.console.print(f"[yellow]warning[/yellow]: {escape(redact(message))}")

    def on_event(self, event: str, trial: Trial, details: dict[str, Any]) -> None:
        label = escape(f"{trial.name} · seed {trial.seed}")
        if event == "start":
            self._running += 1
            resumed = int(details.get("epochs_done", 0))
            self._advance(trial, resumed)
            note = f" (resumes after epoch {resumed})" if resumed else ""
            self.console.print(f"[cyan]▶[/cyan] {label}{note}")
        elif event == "epoch":
            shown = "  ".join(fmt.format(details[k]) for k, fmt in _EPOCH_METRICS.items() if k in details)
            total = details.get("epochs_total", self._epochs.get(trial.hash, "?"))
            self.console.print(f"  {label}  epoch {details['epoch']}/{total}  {shown}")
            self._advance(trial, int(details["epoch"]))
        elif event in ("finished", "failed"):
            self._running -= 1
            if event == "finished":
                self._finished += 1
                stopped = details.get("stopped_early")
                note = f", stopped early: {escape(stopped)}" if stopped else ""
                self.console.print(f"[green]✔[/green] {label}{note}")
            else:
                self._failed += 1
                self.console.print(f"[red]✘[/red] {label}: {escape(last_line(details['error']))}")
            # What it will not train comes off the total, so the ETA is for the work that remains.
            self._epochs[trial.hash] = self._done_epochs.get(trial.hash, 0)
            self._refresh()

    def _advance(self, trial: Trial, epochs_done: int) -> None:
        self._done_epochs[trial.hash] = max(self._done_epochs.get(trial.hash, 0), epochs_done)
        self._refresh()

    def _refresh(self) -> None:
        if self._task is None:
            return
        self._progress.update(
            self._task,
            total=max(sum(self._epochs.values()), 1),
            completed=sum(self._done_epochs.values()),
            trials=self._counts(),
        )

    def _counts(self) -> str:
        failed = f" · [red]{self._failed} failed[/red]" if self._failed else ""
        return f"trials {self._finished}/{self._total} done · {self._running} running{failed}"
