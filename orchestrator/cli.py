"""``sweetspot``: validate, plan, run, tabulate and report MoE ablation studies.

Exit codes: 0 success, 1 a study ran but some trial failed (or there is nothing to
tabulate), 2 bad input (the study file, an option, resources that can never fit, a Ray
cluster that cannot be joined, an MLflow store that cannot be reached), 130 interrupted
(Ctrl-C; the next ``run`` resumes). Credentials in URIs are redacted from what is printed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

# Tune's new console output ignores verbose=0; sweetspot prints its own progress instead.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# With a tracking server MLflow prints a link for every run it ends; `run` shows the study's one.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.expand import Trial, expand
from orchestrator.redact import redact
from orchestrator.source import PathKey, Problem, StudyError, load
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

# `run` asks for --yes above this many trials.
MAX_TRIALS_WITHOUT_YES = 10_000


def _tracking_errors(command: Callable[..., None]) -> Callable[..., None]:
    """For a command that reads MLflow: a tracking store it cannot reach or read is one line on
    stderr (credentials redacted) and exit 2, not a traceback that shows the URI."""

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> None:
        from mlflow.exceptions import MlflowException

        try:
            command(*args, **kwargs)
        except MlflowException as error:
            message = next((line for line in str(error.message).splitlines() if line.strip()), "")
            err.print("[red]error[/red] ", end="")
            err.print(f"MLflow: {redact(message)}", markup=False)
            raise typer.Exit(2) from None

    return checked


class PlanFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class TableFormat(str, Enum):
    md = "md"
    latex = "latex"
    csv = "csv"
    html = "html"


class StatusFormat(str, Enum):
    table = "table"
    json = "json"


def _load(path: Path) -> tuple[StudySpec, list[Trial]]:
    """The study and its trials, or exit 2 with one located line per problem."""
    try:
        spec, source = load_study(path)
        return spec, expand(spec, source)
    except StudyError as error:
        problems = error.problems
    _refuse(path, problems)


def _refuse(path: Path, problems: Iterable[Problem]) -> NoReturn:
    """Exit 2 (bad input) with one located line per problem: nothing was run."""
    problems = list(problems)
    for problem in problems:
        err.print("[red]error[/red] ", end="")
        err.print(str(problem), markup=False)
    noun = "problem" if len(problems) == 1 else "problems"
    err.print(f"{path}: {len(problems)} {noun}; nothing was run.", markup=False)
    raise typer.Exit(2)


def _check_data(path: Path, trials: list[Trial]) -> None:
    """Exit 2 before anything starts when what the trials need on this machine is missing: data
    this machine can see that is missing or malformed, or the tutel backend where tutel is not
    installed. Each problem is located at the line of the study file that asks for it."""
    from trainer.data import check_data
    from trainer.moe import tutel_backend

    source = load(path)
    problems: dict[str, Problem] = {}
    seen: set[str] = set()
    for trial in trials:
        data = trial.config.data
        if data.model_dump_json() not in seen:
            seen.add(data.model_dump_json())
            for message in check_data(data):
                problem = source.problem(trial.origin(_data_field(message, data)), message)
                problems.setdefault(str(problem), problem)
        moe = trial.config.model.moe
        if not trial.config.model.is_dense and moe.backend == "tutel" and not tutel_backend.available():
            problem = source.problem(trial.origin(("model", "moe", "backend")), TUTEL_MISSING)
            problems.setdefault(str(problem), problem)
    if problems:
        _refuse(path, problems.values())


TUTEL_MISSING = (
    "backend 'tutel', but tutel is not installed here (it is not on PyPI: "
    "pip install --no-build-isolation git+https://github.com/microsoft/tutel@main); "
    "or use backend 'auto' (tutel where it is installed, else native) or 'native'"
)


def _data_field(message: str, data: Any) -> tuple[PathKey, ...]:
    """The data field a :func:`trainer.data.check_data` sentence is about: it starts with the field
    (``data.root '...' is not a folder``, ``data.ood 'r': ...``); else the root, whose folders it
    is about."""
    match = re.match(r"data\.(ood '(?P<ood>[a-z0-9_]+)': (?P<root>root )?|(?P<field>[a-z_]+))", message)
    if match and match["ood"]:
        names = [ood.metric_name for ood in data.ood]
        if match["ood"] not in names:
            return ("data", "ood")
        return ("data", "ood", names.index(match["ood"]), *(("root",) if match["root"] else ()))
    if match and match["field"] in type(data).model_fields:
        return ("data", match["field"])
    return ("data", "root") if data.root is not None else ("data",)


def _check_size(path: Path, trials: list[Trial], yes: bool) -> None:
    """Exit 2 before anything starts when a study has more than MAX_TRIALS_WITHOUT_YES trials and
    ``--yes`` does not confirm them: a grid one axis too large is a typo worth a week of GPUs."""
    if yes or len(trials) <= MAX_TRIALS_WITHOUT_YES:
        return
    reason = (
        f"the study expands to {len(trials):,} trials, more than {MAX_TRIALS_WITHOUT_YES:,}; check the grid "
        "and seeds (`sweetspot plan` lists the trials), or pass --yes to run them all"
    )
    source = load(path)
    where = next((key for key in ("grid", "cases") if key in source.tree), "seeds")
    _refuse(path, [source.problem((where,), reason)])


@app.command()
def validate(study: StudyPath) -> None:
    """Check a study file: schema, axes and every expanded trial. Exit 2 on any problem."""
    spec, trials = _load(study)
    _check_data(study, trials)
    configs = len({t.name for t in trials})
    out.print(f"[green]ok[/green] {study}: study '{spec.name}', {len(trials)} trials ({configs} configurations × seeds)")


@app.command()
@_tracking_errors
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
    ctx: typer.Context,
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
    yes: Annotated[
        bool, typer.Option("--yes", help=f"Run a study of more than {MAX_TRIALS_WITHOUT_YES:,} trials.")
    ] = False,
) -> None:
    """Run every trial of the study that is not FINISHED yet, then print the result table."""
    _use_token_auth_to_join(address)  # before anything imports ray
    from mlflow.exceptions import MlflowException

    from orchestrator.launch import ClusterError, ResourceError, StudyInterrupted, TrackingError, run_study
    from orchestrator.lineage import LineageError, resolve_inits
    from orchestrator.lock import StudyLocked, study_lock
    from orchestrator.outbox import HTTP_ENV_DEFAULTS
    from orchestrator.progress import StudyProgress
    from orchestrator.status import last_line
    from orchestrator.tracking import StudyStore

    spec, trials = _load(study)
    _check_size(study, trials, yes)
    _check_data(study, trials)
    try:
        inits = resolve_inits(trials)
    except LineageError as error:
        err.print(f"[red]error[/red] {study}: ", end="")
        err.print(str(error), markup=False)
        raise typer.Exit(2) from None
    try:
        ctx.with_resource(study_lock(spec.output_dir, spec.name))
    except StudyLocked as error:
        err.print("[red]error[/red] ", end="")
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
    uri = tracking_uri or spec.tracking_uri
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        store = StudyStore.open(spec, tracking_uri)
    except MlflowException as error:
        err.print("[red]error[/red] ", end="")
        err.print(f"cannot reach MLflow at {redact(uri)}: {redact(last_line(str(error)))}", markup=False)
        err.print("Nothing was started. Is the tracking server up, and the URI right?")
        raise typer.Exit(2) from None
    out.print(f"[bold]{spec.name}[/bold]: {len(trials)} trials · results in {spec.output_dir}")
    out.print(f"MLflow: {_mlflow_hint(study, uri, store.experiment_id)}", markup=False)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0" if verbose else "1")
    started = time.monotonic()

    def interrupted(signum: int) -> None:
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        err.print(f"{what}: unfinished trials are marked KILLED; `sweetspot run {study}` resumes them.")

    try:
        with StudyProgress(out, spec.name) as progress:

            def ray_lost(signum: int) -> None:
                progress.close()  # the process exits without unwinding
                err.print("the local Ray went down with the signal: not waiting for the trials to stop")
                interrupted(signum)

            outcome = run_study(
                spec, trials, store, address=address, dashboard=dashboard, verbose=verbose,
                retry_failed=retry_failed, inits=inits, on_event=progress.on_event,
                on_start=progress.on_start, on_interrupt=progress.on_interrupt, on_outage=progress.on_outage,
                on_ray_lost=ray_lost,
            )  # fmt: skip
    except ResourceError as error:
        _refuse(study, [load(study).problem(("resources",), str(error))])
    except (ClusterError, TrackingError) as error:
        err.print("[red]error[/red] ", end="")
        err.print(redact(str(error)), markup=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as error:
        # 128 + the signal, as a shell reports it: 130 for Ctrl-C, 143 for SIGTERM.
        signum = error.signum if isinstance(error, StudyInterrupted) else signal.SIGINT
        interrupted(signum)
        raise typer.Exit(128 + signum) from None
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
    if outcome.pending_writes:
        err.print(
            f"MLflow at {redact(uri)} is still unreachable: {outcome.pending_writes} writes (results, trial "
            f"states) are kept in {outcome.journal}; the next `sweetspot run {study}` writes them first.",
            markup=False,
        )
    else:
        _print_table(spec, trials, store)
    by_hash = {t.hash: t for t in trials}
    for trial_hash, error in outcome.failed.items():
        trial = by_hash[trial_hash]
        err.print(f"[red]failed[/red] {trial.name} seed {trial.seed}: ", end="")
        err.print(last_line(error), markup=False)
    if outcome.failed:
        err.print("Full error texts: the `sweetspot.error` tag and error.txt of each failed run in MLflow.")
    if outcome.incomplete:
        err.print(f"{len(outcome.incomplete)} trials did not finish; `sweetspot run {study}` resumes them.")
    if not outcome.ok:
        raise typer.Exit(1)


@app.command()
@_tracking_errors
def table(
    study: StudyPath,
    format: Annotated[TableFormat, typer.Option("--format", "-f", help="Output format.")] = TableFormat.md,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file.")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
) -> None:
    """Print the study's result table from MLflow (one row per configuration, seeds as mean ± std).

    Rows in study order, laid out by the study's `table:` section."""
    from dashboards.tables import render
    from orchestrator.results import collect
    from orchestrator.tracking import StudyStore

    spec, trials = _load(study)
    if not _store_exists(spec, tracking_uri):
        err.print(f"no results for study '{spec.name}' yet: run `sweetspot run {study}` first.")
        raise typer.Exit(1)
    store = StudyStore.open(spec, tracking_uri, create=False)
    try:
        text = render(collect(trials, store, spec.table.metrics), spec.table, format.value)
    except ValueError as error:  # a pivot with two configurations in one cell
        err.print(f"[red]error[/red] {study}: ", end="")
        err.print(str(error), markup=False)
        raise typer.Exit(2) from None
    if output:
        output.write_text(text)
        out.print(f"wrote {output}")
    else:
        sys.stdout.write(text)


@app.command()
@_tracking_errors
def figures(
    study: StudyPath,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Folder for the figures (default: <output>/figures)."),
    ] = None,
    metric: Annotated[str, typer.Option(help="The metric to plot against active parameters.")] = "val_top1",
    all_seeds: Annotated[
        bool,
        typer.Option(
            "--all-seeds", help="Routing figures of every seed, not only each configuration's first."
        ),
    ] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
) -> None:
    """Write the study's paper figures (PNG and SVG): Pareto front, experts × mlp_ratio, routing.

    The routing figures are drawn from each MoE configuration's routing analysis."""
    from dashboards.figures import fetch_routing, write_study_figures
    from orchestrator.results import collect
    from orchestrator.status import open_store
    from orchestrator.tracking import StudyStore

    spec, trials = _load(study)
    if open_store(spec, tracking_uri) is None:
        err.print(f"no results for study '{spec.name}' yet: run `sweetspot run {study}` first.")
        raise typer.Exit(1)
    folder = output or spec.output_dir / "figures"
    # collect reads runs with StudyStore.runs(); open_store's ReadStore only tells whether the study ran.
    store = StudyStore.open(spec, tracking_uri, create=False)
    results = collect(trials, store, list(dict.fromkeys([*spec.table.metrics, metric])))
    finished = results[results["status"] == "FINISHED"]
    if finished.empty:
        err.print(f"no trial of study '{spec.name}' has finished yet: there is nothing to draw.")
        raise typer.Exit(1)
    if finished[metric].isna().all():
        err.print(f"[red]error[/red] --metric: no finished trial logged {metric!r}; ", end="")
        err.print(f"the study's table metrics are {', '.join(spec.table.metrics)}.", markup=False)
        raise typer.Exit(2)
    # Each routing.npz lands in the folder its figures go to: routing/<short hash>/.
    routing = fetch_routing(store, trials, folder / "routing", all_seeds=all_seeds)
    paths = write_study_figures(results, routing, folder, metric)
    figures_written = len({path.with_suffix("") for path in paths})
    out.print(f"wrote {figures_written} figures (PNG and SVG) to {folder}", markup=False)


@app.command()
@_tracking_errors
def report(
    study: StudyPath,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="The HTML file to write (default: <output>/report.html)."),
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI.")] = None,
) -> None:
    """Write the study's report: one self-contained HTML page to mail to a colleague.

    The summary, the result table, every figure, a link to each trial's MLflow run, the failures
    and the study file."""
    import tempfile

    from dashboards.figures import fetch_routing, write_study_figures
    from dashboards.report import write_report
    from orchestrator.results import collect
    from orchestrator.status import open_store
    from orchestrator.tracking import StudyStore

    spec, trials = _load(study)
    if open_store(spec, tracking_uri) is None:
        err.print(f"no results for study '{spec.name}' yet: run `sweetspot run {study}` first.")
        raise typer.Exit(1)
    store = StudyStore.open(spec, tracking_uri, create=False)
    metric = "val_top1"
    results = collect(trials, store, list(dict.fromkeys([*spec.table.metrics, metric])))
    path = output or spec.output_dir / "report.html"
    # The figures are embedded in the page, so their files are only needed while it is written.
    with tempfile.TemporaryDirectory(prefix="sweetspot-report-") as scratch:
        folder = Path(scratch)
        figures: list[Path] = []
        if (results["status"] == "FINISHED").any():  # a study whose every trial failed still gets its page
            routing = fetch_routing(store, trials, folder / "routing")
            figures = write_study_figures(results, routing, folder, metric)
        try:
            write_report(study, spec, trials, store, results, figures, folder, path, tracking_uri, metric)
        except ValueError as error:  # a pivot with two configurations in one cell
            err.print(f"[red]error[/red] {study}: ", end="")
            err.print(str(error), markup=False)
            raise typer.Exit(2) from None
    out.print(f"wrote {path}", markup=False)


@app.command()
@_tracking_errors
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
@_tracking_errors
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
        out.print(redact(f"{uri.rstrip('/')}/#/experiments/{store.experiment_id}"), markup=False)
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
    from dashboards.tables import render
    from orchestrator.results import collect

    try:
        text = render(collect(trials, store, spec.table.metrics), spec.table, "md")
    except ValueError as error:  # the table cannot be laid out; the study's results are safe in MLflow
        err.print("[red]table[/red] ", end="")
        err.print(str(error), markup=False)
        return
    # Plain stdout: a Markdown table must not be re-wrapped to the terminal width.
    sys.stdout.write("\n" + text)


def _use_token_auth_to_join(address: str | None) -> None:
    """Make Ray's client send this machine's token when it joins a cluster (call before importing ray).

    A cluster started with ``ray start`` where a token exists (``~/.ray/auth_token``) asks every
    client for it (Ray 2.60), but Ray's client only sends one in token mode, which it reads from
    ``RAY_AUTH_MODE`` once, on import. A cluster without authentication accepts such a client too.
    An explicit ``RAY_AUTH_MODE`` is left alone.
    """
    if address is None or "RAY_AUTH_MODE" in os.environ:
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
    if os.environ.get("RAY_AUTH_TOKEN") or path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def _mlflow_hint(study: Path, uri: str, experiment_id: str) -> str:
    """Where to watch the study in MLflow: the server's page, or how to start the UI on the store
    (credentials in the URI redacted)."""
    if uri.startswith(("http://", "https://")):
        return redact(f"{uri.rstrip('/')}/#/experiments/{experiment_id}")
    return redact(f"sweetspot ui {study}  (or: mlflow ui --backend-store-uri {uri})")


if __name__ == "__main__":
    app()
