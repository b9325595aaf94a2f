"""``sweetspot``: validate, plan, run and tabulate MoE ablation studies.

Exit codes: 0 success, 1 a study ran but some trial failed (or there is nothing to
tabulate), 2 bad input (the study file, an option, or resources that can never fit).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

# Tune's new console output ignores verbose=0; sweetspot prints its own progress instead.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.expand import Trial, expand
from orchestrator.source import StudyError
from orchestrator.spec import StudySpec, load_study

app = typer.Typer(
    name="sweetspot",
    help="Declarative ablation studies for Mixture-of-Experts vision models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

StudyPath = Annotated[Path, typer.Argument(help="The study YAML.", show_default=False)]


class PlanFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class TableFormat(str, Enum):
    md = "md"
    csv = "csv"


class StatusFormat(str, Enum):
    table = "table"
    json = "json"


def _load(path: Path) -> tuple[StudySpec, list[Trial]]:
    """The study and its trials, or exit 2 with one located line per problem."""
    try:
        spec, source = load_study(path)
        return spec, expand(spec, source)
    except StudyError as error:
        for problem in error.problems:
            err.print("[red]error[/red] ", end="")
            err.print(str(problem), markup=False)
        noun = "problem" if len(error.problems) == 1 else "problems"
        err.print(f"{path}: {len(error.problems)} {noun}; nothing was run.", markup=False)
        raise typer.Exit(2) from None


def _check_data(path: Path, trials: list[Trial]) -> None:
    """Exit 2 before anything starts when data this machine can see is missing or malformed."""
    from trainer.data import check_data

    problems: list[str] = []
    seen: set[str] = set()
    for trial in trials:
        key = trial.config.data.model_dump_json()
        if key not in seen:
            seen.add(key)
            problems += [p for p in check_data(trial.config.data) if p not in problems]
    for problem in problems:
        err.print("[red]error[/red] ", end="")
        err.print(f"{path}: data: {problem}", markup=False)
    if problems:
        err.print(f"{path}: {len(problems)} data problem(s); nothing was run.", markup=False)
        raise typer.Exit(2)


@app.command()
def validate(study: StudyPath) -> None:
    """Check a study file: schema, axes and every expanded trial. Exit 2 on any problem."""
    spec, trials = _load(study)
    _check_data(study, trials)
    configs = len({t.name for t in trials})
    out.print(f"[green]ok[/green] {study}: study '{spec.name}', {len(trials)} trials ({configs} configurations × seeds)")


@app.command()
def plan(
    study: StudyPath,
    format: Annotated[PlanFormat, typer.Option("--format", "-f", help="Output format.")] = PlanFormat.table,
    measure: Annotated[
        bool, typer.Option(help="Also time inference of each model here and estimate training hours.")
    ] = False,
    device: Annotated[str, typer.Option(help="Device for --measure: cpu or cuda.")] = "cpu",
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI for the State column; default: the study's store.")
    ] = None,
) -> None:
    """List the trials a study expands to, with params, active params, FLOPs and cost, without running them."""
    from orchestrator.plan import plan as plan_trials
    from orchestrator.status import open_store, trial_states

    spec, trials = _load(study)
    plans = plan_trials(trials, measure=measure, device=device)
    # Where the study ran before, each trial's state (done, partial, ...); never creates a store.
    store = open_store(spec, tracking_uri)
    states = trial_states(trials, store)
    rows = [p.row() | {"state": states[p.trial.hash]} for p in plans]
    if format is PlanFormat.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if format is PlanFormat.csv:
        import pandas as pd

        flat = [{k: v for k, v in row.items() if k not in ("axes", "trial")} | row["axes"] for row in rows]
        sys.stdout.write(pd.DataFrame(flat).to_csv(index=False))
        return
    # One line per configuration; its seeds are counted and their compute summed.
    groups: dict[str, list[dict]] = {}
    for row in rows:
        key = json.dumps({**row["trial"], "seed": None}, sort_keys=True)
        groups.setdefault(key, []).append(row)
    table = Table(title=f"{spec.name}: {len(trials)} trials", title_justify="left")
    table.add_column("Architecture", overflow="fold", ratio=2, min_width=22)
    table.add_column("Seeds", justify="right", no_wrap=True)
    if store is not None:  # before the first run every trial is new: the column would say nothing
        table.add_column("State", no_wrap=True)
    headings = ["Params M", "Active M", "GFLOPs", "Train PFLOP"] + (["Img/s", "Est. h"] if measure else [])
    for heading in headings:
        table.add_column(heading, justify="right", no_wrap=True)
    table.add_column("Axes", overflow="fold", ratio=1)
    for members in groups.values():
        first = members[0]
        cells = [
            first["name"], str(len(members)),
            *([_states_cell([m["state"] for m in members])] if store is not None else []),
            f"{first['params_total'] / 1e6:.2f}", f"{first['params_active'] / 1e6:.2f}",
            f"{first['gflops']:.3g}",
            _sum((m["train_pflop"] for m in members), "{:.3g}"),
        ]  # fmt: skip
        if measure:
            cells += [f"{first['images_per_s']:.0f}", _sum((m["train_hours"] for m in members), "{:.2f}")]
        axes = ", ".join(f"{k}={v}" for k, v in first["axes"].items() if k != "seed" and v is not None)
        table.add_row(*cells, axes)
    out.print(table)
    total = f"total training compute: {_sum((r['train_pflop'] for r in rows), '{:.3g}')} PFLOP (3 × forward multiply-adds)"
    if measure:
        hours = _sum((r["train_hours"] for r in rows), "{:.2f}")
        total += f"; about {hours} device-hours at the measured {device} throughput"
    if any(r["train_pflop"] is None for r in rows):
        total += "\n? = the dataset is not visible from here, so its images could not be counted"
    out.print(total)


def _states_cell(states: list[str]) -> str:
    """One configuration's seeds: their state when they agree, else how many are in each."""
    from orchestrator.status import STATES

    if len(set(states)) == 1:
        return _styled_state(states[0])
    return ", ".join(f"{states.count(s)} {_styled_state(s)}" for s in STATES if s in states)


def _styled_state(state: str) -> str:
    style = {"done": "green", "running": "cyan", "partial": "yellow", "failed": "red", "new": "dim"}[state]
    return f"[{style}]{state}[/{style}]"


def _sum(values: Iterable[float | None], fmt: str) -> str:
    """Formatted sum, or "?" when any part is unknown."""
    values = list(values)
    return "?" if any(v is None for v in values) else fmt.format(sum(values))


@app.command()
def run(
    study: StudyPath,
    address: Annotated[
        str | None, typer.Option(help="Join a Ray cluster ('auto' or ray://host:port); default: start a local Ray.")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI; default: the study's sqlite store.")
    ] = None,
    dashboard: Annotated[bool, typer.Option(help="Start the Ray dashboard with the local Ray.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Run trials that FAILED before again.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's and the workers' logs.")] = False,
) -> None:
    """Run every trial of the study that is not FINISHED yet, then print the result table."""
    from orchestrator.launch import ResourceError, run_study
    from orchestrator.lineage import LineageError, resolve_inits
    from orchestrator.tracking import StudyStore

    spec, trials = _load(study)
    _check_data(study, trials)
    try:
        inits = resolve_inits(trials)
    except LineageError as error:
        err.print(f"[red]error[/red] {study}: ", end="")
        err.print(str(error), markup=False)
        raise typer.Exit(2) from None
    if not verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        # Tune logs a failed trial's whole traceback and advises Tuner.restore after Ctrl-C; we print
        # a one-line reason (the full text is in MLflow) and how a study resumes instead.
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
        if not dashboard:
            # Token auth only matters to the dashboard, which this local Ray does not start.
            logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    store = StudyStore.open(spec, tracking_uri)
    uri = tracking_uri or spec.tracking_uri
    out.print(f"[bold]{spec.name}[/bold]: {len(trials)} trials · results in {spec.output_dir}")
    out.print(f"MLflow: mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"MLflow: {uri}")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0" if verbose else "1")
    started = time.monotonic()
    try:
        outcome = run_study(
            spec, trials, store, address=address, dashboard=dashboard, verbose=verbose,
            retry_failed=retry_failed, inits=inits, on_event=_progress(len(trials)),
        )
    except ResourceError as error:
        err.print(f"[red]error[/red] {study}: resources: {error}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print(f"interrupted: unfinished trials are marked KILLED; `sweetspot run {study}` resumes them.")
        raise typer.Exit(130) from None
    elapsed = time.monotonic() - started
    if outcome.skipped:
        out.print(f"{len(outcome.skipped)} trials already FINISHED in MLflow: skipped.")
    if outcome.previously_failed:
        out.print(f"{len(outcome.previously_failed)} trials FAILED before: skipped (--retry-failed runs them again).")
    stopped = f" ({len(outcome.stopped)} stopped early)" if outcome.stopped else ""
    out.print(
        f"{len(outcome.finished)} finished{stopped}, {len(outcome.failed)} failed, "
        f"{len(outcome.incomplete)} incomplete in {elapsed:.0f} s."
    )
    _print_table(spec, trials, store)
    by_hash = {t.hash: t for t in trials}
    for trial_hash, error in outcome.failed.items():
        trial = by_hash[trial_hash]
        err.print(f"[red]failed[/red] {trial.name} seed {trial.seed}: ", end="")
        err.print(_last_line(error), markup=False)
    if outcome.failed:
        err.print("Full error texts: the `sweetspot.error` tag and error.txt of each failed run in MLflow.")
    if outcome.incomplete:
        err.print(f"{len(outcome.incomplete)} trials did not finish; `sweetspot run {study}` resumes them.")
    if not outcome.ok:
        raise typer.Exit(1)


@app.command()
def table(
    study: StudyPath,
    format: Annotated[TableFormat, typer.Option("--format", "-f", help="Output format.")] = TableFormat.md,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
) -> None:
    """Print the study's result table from MLflow (one row per trial, in study order)."""
    from dashboards.tables import to_csv, to_markdown
    from orchestrator.results import collect
    from orchestrator.tracking import StudyStore

    spec, trials = _load(study)
    if not _store_exists(spec, tracking_uri):
        err.print(f"no results for study '{spec.name}' yet: run `sweetspot run {study}` first.")
        raise typer.Exit(1)
    store = StudyStore.open(spec, tracking_uri, create=False)
    results = collect(trials, store, spec.table.metrics)
    text = to_markdown(results, spec.table.metrics) + "\n" if format is TableFormat.md else to_csv(results)
    if output:
        output.write_text(text)
        out.print(f"wrote {output}")
    else:
        sys.stdout.write(text)


@app.command()
def status(
    study: StudyPath,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh until every trial is done or failed.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.", min=0.1)] = 5.0,
    format: Annotated[StatusFormat, typer.Option("--format", "-f", help="Output format (json: once).")] = (
        StatusFormat.table
    ),
) -> None:
    """Show each trial's state, epoch, metrics, elapsed time and ETA (from MLflow, also while `run` runs)."""
    from orchestrator.status import StatusReader, open_store

    spec, trials = _load(study)
    store = open_store(spec, tracking_uri)
    if store is None:
        err.print(f"no results for study '{spec.name}' yet: run `sweetspot run {study}` first.")
        raise typer.Exit(1)
    reader = StatusReader(spec, trials, store)
    if format is StatusFormat.json:
        sys.stdout.write(json.dumps(reader.read().to_json(), indent=2) + "\n")
        return
    if not watch:
        out.print(_status_view(reader.read()))
        return
    from rich.live import Live

    try:
        with Live(console=out, auto_refresh=False) as live:
            while True:
                current = reader.read()
                live.update(_status_view(current), refresh=True)
                if current.settled:
                    return
                time.sleep(interval)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a watch ends: not an error


def _status_view(status: Any) -> Any:
    """The summary line first (it stays on screen when a long table is cropped), the table, the errors."""
    from rich.console import Group
    from rich.measure import Measurement

    table = _status_table(status, show_hash=True)
    if Measurement.get(out, out.options.update_width(10_000), table).maximum > out.width:
        table = _status_table(status, show_hash=False)  # a narrow terminal: names before hashes
    errors = [
        f"[red]failed[/red] {escape(row.name)} seed {row.seed}: {escape(row.error)}"
        for row in status.trials
        if row.error
    ]
    return Group(escape(status.summary()), table, *errors)


def _status_table(status: Any, show_hash: bool) -> Table:
    from dashboards.tables import HEADINGS
    from orchestrator.status import format_duration

    table = Table(title=f"{status.study}: {len(status.trials)} trials", title_justify="left")
    table.add_column("Architecture", overflow="fold", min_width=16)
    table.add_column("Seed", justify="right", no_wrap=True)
    if show_hash:
        table.add_column("Hash", no_wrap=True)
    table.add_column("State", no_wrap=True)
    table.add_column("Epoch", justify="right", no_wrap=True)
    for metric in status.metrics:
        table.add_column(HEADINGS.get(metric, metric), justify="right")
    table.add_column("Elapsed", justify="right", no_wrap=True)
    table.add_column("ETA", justify="right", no_wrap=True)
    for row in status.trials:
        metrics = [_metric_cell(metric, row.metrics[metric]) for metric in status.metrics]
        table.add_row(
            escape(row.name), str(row.seed), *([row.hash] if show_hash else []), _styled_state(row.state),
            f"{row.epoch}/{row.epochs_total}", *metrics, format_duration(row.elapsed_s),
            format_duration(row.eta_s),
        )  # fmt: skip
    return table


def _metric_cell(metric: str, value: float | None) -> str:
    """As in the result table: images/s without decimals, the rest with two."""
    if value is None:
        return "–"
    return f"{value:.0f}" if metric.endswith("images_per_s") else f"{value:.2f}"


@app.command()
def ui(
    study: StudyPath,
    port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Address the MLflow UI listens on.")] = "127.0.0.1",
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
) -> None:
    """Start the MLflow UI on the study's store and print the address of its experiment."""
    from orchestrator.status import open_store

    spec, _ = _load(study)
    uri = tracking_uri or spec.tracking_uri
    store = open_store(spec, tracking_uri)
    if store is None:
        err.print(f"no results for study '{spec.name}' yet: run `sweetspot run {study}` first.")
        raise typer.Exit(1)
    if uri.startswith(("http://", "https://")):
        # A tracking server already serves the UI: there is nothing to start.
        out.print(f"{uri.rstrip('/')}/#/experiments/{store.experiment_id}", markup=False)
        return
    out.print(f"{spec.name}: {experiment_url(host, port, store.experiment_id)}", markup=False)
    argv = ui_argv(uri, host, port)
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # the UI replaces this process: Ctrl-C stops it


def ui_argv(uri: str, host: str, port: int) -> list[str]:
    """``mlflow ui`` on the study's store, with this environment's mlflow when there is one (a venv
    that is not activated has it next to its python, not on PATH)."""
    beside = Path(sys.executable).parent / "mlflow"
    return [str(beside) if beside.is_file() else "mlflow", "ui", "--backend-store-uri", uri,
            "--host", host, "--port", str(port)]  # fmt: skip


def experiment_url(host: str, port: int, experiment_id: str) -> str:
    """Where a browser finds the experiment (a UI listening on every address is reached locally)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/#/experiments/{experiment_id}"


def _store_exists(spec: StudySpec, tracking_uri: str | None) -> bool:
    uri = tracking_uri or spec.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return False
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_experiment_by_name(spec.experiment_name) is not None


def _print_table(spec: StudySpec, trials: list[Trial], store: Any) -> None:
    from dashboards.tables import to_markdown
    from orchestrator.results import collect

    # Plain stdout: a Markdown table must not be re-wrapped to the terminal width.
    sys.stdout.write("\n" + to_markdown(collect(trials, store, spec.table.metrics), spec.table.metrics) + "\n")


def _last_line(error: str) -> str:
    """The exception line of a traceback: what a person needs to see first."""
    return next((line.strip() for line in reversed(error.strip().splitlines()) if line.strip()), error)


def _progress(total: int) -> Any:
    done = {"count": 0}

    def on_event(event: str, trial: Trial, details: dict[str, Any]) -> None:
        label = f"{trial.name} · seed {trial.seed}"
        if event == "start":
            out.print(f"[cyan]▶[/cyan] {label}")
        elif event == "epoch":
            formats = {"train_loss": "loss {:.3f}", "val_top1": "top-1 {:.1f}%", "images_per_s": "{:.0f} im/s"}
            shown = "  ".join(fmt.format(details[key]) for key, fmt in formats.items() if key in details)
            out.print(f"  {label}  epoch {details['epoch']}/{details.get('epochs_total', '?')}  {shown}")
        elif event == "finished":
            done["count"] += 1
            out.print(f"[green]✔[/green] {label} ({done['count']}/{total})")
        elif event == "failed":
            done["count"] += 1
            out.print(f"[red]✘[/red] {escape(label)}: {escape(_last_line(details['error']))} ({done['count']}/{total})")

    return on_event


if __name__ == "__main__":
    app()
