"""The study report: one self-contained HTML page to mail to a colleague.

The page holds the study's name, description and a summary of its trials, the result table (and
the plain one beside a pivot), every figure of :func:`dashboards.figures.write_study_figures` with a
caption, one row per trial with its MLflow run, the failures with their reasons, and the study
file itself. Nothing is fetched when it opens: the CSS is inline and the figures are PNGs in
``data:`` URIs (PNG rather than inline SVG: matplotlib's SVGs reuse element ids across figures,
and ids must be unique within one page).

Every function but :func:`write_report` and :func:`trial_runs` is pure: data in, HTML out. Every
value that comes from the study or from MLflow is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from dashboards.tables import HEADINGS, render
from orchestrator.redact import redact
from orchestrator.results import FINISHED, NOT_RUN
from orchestrator.spec import StudySpec, TableSpec
from orchestrator.status import last_line
from orchestrator.tags import TAG_ERROR, TAG_HASH

if TYPE_CHECKING:
    from orchestrator.expand import Trial
    from orchestrator.tracking import StudyStore

FAILED = "FAILED"
# MLflow run statuses as the summary words them; done, failed and not run are always shown.
_STATUS_WORDS = {
    FINISHED: "done",
    FAILED: "failed",
    NOT_RUN: "not run",
    "RUNNING": "running",
    "SCHEDULED": "running",
    "KILLED": "interrupted",
}
_ALWAYS_COUNTED = ("done", "failed", "not run")
MISSING = "–"

# What each figure of write_study_figures shows: its file stem → (title, caption). ``{metric}``
# is the plotted metric's heading. The README's figure table says the same in fewer words.
_STUDY_CAPTIONS = {
    "pareto": (
        "Pareto front",
        (
            "{metric} against active parameters per sample, one point per configuration (seeds "
            "averaged; error bars: their standard deviation). Dense models are squares; the "
            "Pareto-optimal configurations have a black edge and are joined (the paper's Figure 2)."
        ),
    ),
    "experts_mlp_ratio": (
        "Experts × MLP ratio",
        (
            "Mean {metric} by number of experts (rows) and MLP ratio (columns), one panel per value "
            "of the other axes; colours centre on the dense baseline of the same backbone and each "
            "cell shows its difference to it (the paper's Figure 3)."
        ),
    ),
}
_ROUTING_CAPTIONS = {
    "class_experts": (
        "Top expert per class",
        "Per MoE layer, each class's share of tokens per top expert (the paper's Figure 9, top).",
    ),
    "expert_similarity": (
        "Expert similarity",
        (
            "Per MoE layer, the paper's similarity of two experts over images: 1 on the diagonal, 0 "
            "for experts that are never top experts together (Figure 9, bottom)."
        ),
    ),
    "experts_per_image": (
        "Experts per image",
        (
            "Per MoE layer, the mean number of distinct top experts per image, stacked by how often "
            "each expert is active in an image; the dashed line is the layer's number of experts."
        ),
    ),
    "patch_cdf": (
        "Patches per expert",
        (
            "Per MoE layer and expert, the CDF of the patches the expert takes per image, over the "
            "images where it is active (the paper's Figure 8)."
        ),
    ),
}
_SPATIAL_MAP = "spatial_map_"

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1f24;
       background: #fff; max-width: 1200px; margin: 2em auto; padding: 0 1.5em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; margin-top: 2em; }
.meta, figcaption, .note { color: #57606a; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #d0d7de; padding: 0.3em 0.7em; vertical-align: top; }
td[style*="right"] { white-space: nowrap; }
thead th { border-bottom: 2px solid #1b1f24; } .sweetspot-trials th { text-align: left; }
tr.group th { text-align: left; font-style: italic; background: #f6f8fa; }
.summary { font-size: 1.1em; }
.failed { color: #cf222e; } .done { color: #1a7f37; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { margin-top: 0.4em; max-width: 60em; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 13px; }
code { font-size: 0.92em; }
"""


@dataclass(frozen=True)
class ReportFigure:
    """One figure on the page.

    Attributes:
        key: its path under the figures folder, without suffix (``pareto``, ``routing/<hash>/patch_cdf``).
        group: the heading it sits under (the study, or the trial whose routing it draws).
        title: a few words, also the image's alt text.
        caption: what it shows.
        png: the image.
    """

    key: str
    group: str
    title: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class TrialRun:
    """A trial's latest MLflow run: its id and, for a failed run, its ``sweetspot.error`` text."""

    run_id: str
    error: str | None = None


@dataclass(frozen=True)
class Report:
    """Everything the page shows.

    Attributes:
        name: the study's name.
        description: the study's description (may be empty).
        generated: when the report was made (timezone-aware, shown as such).
        study_file: the study file as the user named it (for ``sweetspot ui`` and the spec heading).
        spec_text: the study file's text.
        results: :func:`orchestrator.results.collect`'s per-trial frame.
        tables: (heading, HTML) of each result table, from :func:`result_tables`.
        figures: from :func:`report_figures`, in page order.
        runs: short trial hash → its run (trials that never ran have none).
        tracking_uri: the MLflow tracking URI the runs are in.
        experiment_id: the study's MLflow experiment.
        metric: the metric the trials table shows next to each trial.
    """

    name: str
    description: str
    generated: datetime
    study_file: str
    spec_text: str
    results: pd.DataFrame
    tables: list[tuple[str | None, str]]
    figures: list[ReportFigure]
    runs: dict[str, TrialRun]
    tracking_uri: str
    experiment_id: str
    metric: str = "val_top1"


# ---- The entry point ----------------------------------------------------------------------------------------


def write_report(
    study: Path,
    spec: StudySpec,
    trials: list[Trial],
    store: StudyStore,
    results: pd.DataFrame,
    figures: Iterable[Path],
    figures_dir: Path,
    output: Path,
    tracking_uri: str | None = None,
    metric: str = "val_top1",
) -> Path:
    """Write the study's report page to ``output`` (its folder is created) and return it.

    Args:
        study: the study YAML (its text goes on the page).
        spec: the loaded study.
        trials: its trials (:func:`orchestrator.expand.expand`).
        store: the study's MLflow experiment (run ids and error texts are read from it).
        results: :func:`orchestrator.results.collect`'s frame for ``trials``.
        figures: the files :func:`dashboards.figures.write_study_figures` wrote (PNG and SVG);
            the PNGs are embedded.
        figures_dir: the folder they were written to.
        output: the HTML file to write.
        tracking_uri: the MLflow tracking URI; default the study's.
        metric: the metric the figures plot (for their captions) and the trials table shows.

    Raises:
        ValueError: the study's ``table:`` cannot be laid out (a pivot with two configurations in
            one cell).
    """
    report = Report(
        name=spec.name,
        description=redact(spec.description),
        generated=datetime.now().astimezone(),
        study_file=str(study),
        spec_text=redact(study.read_text(encoding="utf-8")),  # a page to mail: no credentials on it
        results=results,
        tables=result_tables(results, spec.table),
        figures=report_figures(figures, figures_dir, results, metric),
        runs=trial_runs(store, trials),
        tracking_uri=redact(tracking_uri or spec.tracking_uri),
        experiment_id=store.experiment_id,
        metric=metric,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_report(report), encoding="utf-8")
    return output


def trial_runs(store: StudyStore, trials: list[Trial]) -> dict[str, TrialRun]:
    """Short trial hash → the trial's newest run (the one :func:`~orchestrator.results.collect` reads)."""
    latest: dict[str, Any] = {}
    for run in store.runs():  # newest first
        latest.setdefault(run.data.tags.get(TAG_HASH, ""), run)
    found: dict[str, TrialRun] = {}
    for trial in trials:
        run = latest.get(trial.hash)
        if run is not None:
            error = run.data.tags.get(TAG_ERROR) if run.info.status == FAILED else None
            found[trial.short_hash] = TrialRun(run.info.run_id, error)
    return found


def result_tables(results: pd.DataFrame, table: TableSpec) -> list[tuple[str | None, str]]:
    """(heading, HTML) of the study's result table; a pivot comes with the plain table after it,
    so every configuration's numbers are on the page whatever the pivot leaves out."""
    if table.pivot is None:
        return [(None, render(results, table, "html"))]
    pivot = table.pivot
    value = pivot.value or table.metrics[0]
    heading = f"{HEADINGS.get(value, value)} by {pivot.rows} × {pivot.columns}"
    plain = table.model_copy(update={"pivot": None})
    return [
        (heading, render(results, table, "html")),
        ("Every configuration", render(results, plain, "html")),
    ]


def report_figures(
    paths: Iterable[Path], figures_dir: Path, results: pd.DataFrame, metric: str = "val_top1"
) -> list[ReportFigure]:
    """The PNGs among ``paths`` (as :func:`~dashboards.figures.write_study_figures` orders them),
    each with its heading, title and caption."""
    names = {str(row.hash): f"{row.name}, seed {row.seed}" for row in results.itertuples(index=False)}
    shown = HEADINGS.get(metric, metric)
    figures = []
    for path in paths:
        if path.suffix != ".png":
            continue
        key = path.relative_to(figures_dir).with_suffix("").as_posix()
        group, title, caption = figure_caption(key, names, shown)
        figures.append(ReportFigure(key, group, title, caption, path.read_bytes()))
    return figures


def figure_caption(key: str, trial_names: dict[str, str], metric: str) -> tuple[str, str, str]:
    """(heading, title, caption) of the figure at ``key``; ``trial_names`` maps the folder of a
    routing figure (a short trial hash) to "name, seed N"."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "routing":
        trial = trial_names.get(parts[1], parts[1])
        title, caption = _routing_caption(parts[2])
        return f"Routing of {trial}", title, f"{caption} Trial: {trial}."
    title, caption = _STUDY_CAPTIONS.get(key, (key, f"The study's {key} figure."))
    return "Study", title, caption.format(metric=metric)


def _routing_caption(stem: str) -> tuple[str, str]:
    if stem.startswith(_SPATIAL_MAP):
        layer = stem.removeprefix(_SPATIAL_MAP)
        return (
            f"Spatial map, {layer}",
            (
                f"For each expert of layer {layer}, the share of images whose token at each position "
                "goes to it, on one colour scale (the paper's Figure 7)."
            ),
        )
    return _ROUTING_CAPTIONS.get(stem, (stem, f"The routing figure {stem}."))


# ---- The page -----------------------------------------------------------------------------------------------


def render_report(report: Report) -> str:
    """The whole page."""
    sections = [
        ("summary", "Summary", summary_section(report)),
        ("results", "Results", tables_section(report.tables)),
        ("figures", "Figures", figures_section(report.figures)),
        ("trials", "Trials", trials_section(report)),
        ("failures", "Failures", failures_section(report.results, report.runs)),
        ("spec", "Study file", spec_section(report.study_file, report.spec_text)),
    ]
    nav = "".join(f'<a href="#{anchor}">{heading}</a>' for anchor, heading, _ in sections)
    body = "\n".join(
        f'<section id="{anchor}">\n<h2>{heading}</h2>\n{content}</section>'
        for anchor, heading, content in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_text(report.name)}: sweetspot study report</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{header(report)}\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )


def header(report: Report) -> str:
    """The study's name, description, and when and from what the page was made."""
    description = f'<p class="description">{_text(report.description)}</p>\n' if report.description else ""
    when = report.generated
    return (
        f"<header>\n<h1>{_text(report.name)}</h1>\n{description}"
        f'<p class="meta">Study report generated <time datetime="{_text(when.isoformat(timespec="seconds"))}">'
        f"{_text(when.strftime('%Y-%m-%d %H:%M %Z').strip())}</time> by sweetspot "
        f"from <code>{_text(report.study_file)}</code>.</p>\n</header>"
    )


def trial_counts(results: pd.DataFrame) -> dict[str, int]:
    """Trials per state word: done, failed and not run always, then any other state present."""
    counts = dict.fromkeys(_ALWAYS_COUNTED, 0)
    for status in results["status"]:
        word = _STATUS_WORDS.get(status, str(status).lower())
        counts[word] = counts.get(word, 0) + 1
    return counts


def summary_section(report: Report) -> str:
    """How many trials and configurations, what became of them, and where the runs are."""
    results = report.results
    counts = trial_counts(results)
    # Only a state that some trial is in gets its colour: "0 failed" is no alarm.
    states = ", ".join(
        f'<span class="{_css_class(word) if count else "none"}">{count} {_text(word)}</span>'
        for word, count in counts.items()
    )
    configurations = results["name"].nunique() if len(results) else 0
    return (
        f'<p class="summary"><strong>{len(results)}</strong> trials in <strong>{configurations}</strong> '
        f"configurations: {states}.</p>\n"
        f"<p>MLflow: <code>{_text(report.tracking_uri)}</code>, experiment {_text(report.experiment_id)}.</p>\n"
    )


def tables_section(tables: list[tuple[str | None, str]]) -> str:
    """The result tables as :func:`dashboards.tables.render` wrote them (already escaped)."""
    note = (
        '<p class="note">One row per configuration, seeds as mean ± std over the finished ones; '
        "the best value of each column is bold.</p>\n"
    )
    parts = [note]
    for heading, table in tables:
        if heading is not None:
            parts.append(f"<h3>{_text(heading)}</h3>\n")
        parts.append(table)
    return "".join(parts)


def figures_section(figures: list[ReportFigure]) -> str:
    """Each figure under its group's heading, in the order given."""
    if not figures:
        return '<p class="note">No figures: no trial has finished with results to draw.</p>\n'
    note = (
        '<p class="note">Figures use the finished trials only. The routing figures are drawn for the '
        "first seed of each MoE configuration.</p>\n"
    )
    parts = [note]
    group = None
    for figure in figures:
        if figure.group != group:
            group = figure.group
            parts.append(f"<h3>{_text(group)}</h3>\n")
        parts.append(figure_html(figure))
    return "".join(parts)


def figure_html(figure: ReportFigure) -> str:
    """One ``<figure>``: the PNG inline, its title and caption below."""
    data = base64.b64encode(figure.png).decode("ascii")
    return (
        f'<figure class="sweetspot-figure" data-figure="{_text(figure.key)}">\n'
        f'<img src="data:image/png;base64,{data}" alt="{_text(figure.title)}">\n'
        f"<figcaption><strong>{_text(figure.title)}.</strong> {_text(figure.caption)}</figcaption>\n"
        "</figure>\n"
    )


def trials_section(report: Report) -> str:
    """One row per trial, in study order, with its MLflow run: a link when a server serves the
    runs, else the run id and how to open the local store."""
    server = _is_server(report.tracking_uri)
    if server:
        note = f"Each run links to the MLflow server at <code>{_text(report.tracking_uri)}</code>."
    else:
        note = (
            f"The runs are in a local MLflow store (<code>{_text(report.tracking_uri)}</code>), with no "
            f"server to link to: start the MLflow UI with <code>sweetspot ui {_text(report.study_file)}</code> "
            "and find a run by its id."
        )
    metric = report.metric
    headings = ["Trial", "Seed", "Hash", "Status", "Epochs", HEADINGS.get(metric, metric), "MLflow run"]
    head = "".join(f'<th scope="col">{_text(h)}</th>' for h in headings)
    rows = []
    for row in report.results.to_dict("records"):
        run = report.runs.get(str(row["hash"]))
        run_cell = _run_cell(run, report.tracking_uri, report.experiment_id) if run else MISSING
        cells = [
            _text(row["name"]),
            _text(row["seed"]),
            f"<code>{_text(row['hash'])}</code>",
            f'<span class="{_css_class(_STATUS_WORDS.get(row["status"], ""))}">{_text(row["status"])}</span>',
            _text(row["epoch"]),
            _number(row.get(metric)),
            run_cell,
        ]
        rows.append(
            f'<tr data-hash="{_text(row["hash"])}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
        )
    body = "\n".join(rows)
    return (
        f'<p class="note">{note}</p>\n<table class="sweetspot-trials">\n<thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{body}\n</tbody>\n</table>\n"
    )


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page on an MLflow server."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def failures_section(results: pd.DataFrame, runs: dict[str, TrialRun]) -> str:
    """Each FAILED trial with the last line of its error, and the whole error text folded away."""
    failed = results[results["status"] == FAILED]
    if failed.empty:
        return "<p>No trial failed.</p>\n"
    items = []
    for row in failed.to_dict("records"):
        run = runs.get(str(row["hash"]))
        error = run.error if run is not None else None
        label = f"<strong>{_text(row['name'])}</strong>, seed {_text(row['seed'])} (<code>{_text(row['hash'])}</code>)"
        if not error:
            items.append(f"<li>{label}: no error text was recorded.</li>")
            continue
        reason = f'<code class="error">{_text(last_line(error))}</code>'
        full = f"<details><summary>Full error</summary><pre>{_text(redact(error))}</pre></details>"
        items.append(f"<li>{label}: {reason}{full}</li>")
    note = (
        '<p class="note">The last line of each error; the whole text is also the run\'s '
        "<code>sweetspot.error</code> tag and <code>error.txt</code> in MLflow.</p>\n"
    )
    return note + '<ul class="failures">\n' + "\n".join(items) + "\n</ul>\n"


def spec_section(study_file: str, spec_text: str) -> str:
    """The study file as it was written, so the page says exactly what was run."""
    return f"<p><code>{_text(study_file)}</code></p>\n<pre>{_text(spec_text)}</pre>\n"


# ---- Helpers ------------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def _run_cell(run: TrialRun, tracking_uri: str, experiment_id: str) -> str:
    code = f"<code>{_text(run.run_id)}</code>"
    if not _is_server(tracking_uri):
        return code
    return f'<a href="{_text(run_url(tracking_uri, experiment_id, run.run_id))}">{code}</a>'


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:.2f}"


def _css_class(word: str) -> str:
    """A state's CSS class (``not run`` → ``not-run``); escaped, since an unknown MLflow status is
    shown by its own name."""
    return _text(word.replace(" ", "-"))
