"""Paper-style result tables: Markdown (GitHub), LaTeX (booktabs), CSV and HTML.

:func:`render` is the one entry point: the per-trial frame of :func:`orchestrator.results.collect`
and the study's ``table:`` section (:class:`~orchestrator.spec.TableSpec`) in, the text out. Seeds
are aggregated (mean ± sample std over the FINISHED seeds), configurations keep the study's order
(grouped when ``group_by`` asks), and the best value of each metric column is bold, per group.
Markdown, LaTeX and HTML are drawn from one :class:`Layout`; CSV holds the aggregated numbers at
full precision.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import pandas as pd
from tabulate import tabulate

from orchestrator.expand import placement_label
from orchestrator.results import FINISHED, aggregate, lower_is_better, metric_columns, missing, with_deltas
from orchestrator.spec import CONFIG_COLUMNS, FINAL_METRICS, TableSpec, axis_label, resolve_axis
from trainer.models.registry import BACKBONES

Format = Literal["md", "latex", "csv", "html"]
FORMATS: tuple[str, ...] = get_args(Format)

# Column headings as the paper writes them (also used by `sweetspot status`).
HEADINGS = {
    "name": "Architecture",
    "seed": "Seed",
    "seeds": "Seeds",
    "n": "n",
    "status": "Status",
    "epoch": "Epochs",
    "params_total_m": "#Params (×10⁶)",
    "params_active_m": "Active #Params (×10⁶)",
    "gflops": "GFLOPs",
    "val_top1": "Top-1 (%)",
    "val_top5": "Top-5 (%)",
    "val_loss": "Val loss",
    "train_loss": "Train loss",
    "aux_loss": "Aux loss",
    "images_per_s": "Train im/s",
    "inference_images_per_s": "Throughput (im/s)",
    "dropped_fraction": "Dropped tokens",
    "expert_load_cv": "Expert load CV",
    "experts_per_image": "Experts/image",
}
# Axis columns as the paper heads them (Tables 3 and 4); other axes by their name.
AXIS_HEADINGS = {
    "placement": "MoE",
    "experts": "# Experts",
    "top_k": "Top-k",
    "mlp_ratio": "MLP ratio",
    "router": "Router",
    "backbone": "Backbone",
}
# The OOD sets' metric names (OODSet.metric_name) for the ImageNet variants.
OOD_NAMES = {"v2": "IN-V2", "a": "IN-A", "r": "IN-R", "sketch": "IN-Sketch"}
# Metrics that describe a run rather than score it: never bold.
UNRANKED = {"lr", "epochs_total", "resumes", "experts_per_image"}
MISSING = "–"
# What a CSV row says about its configuration, before its axes and metrics.
_CSV_DESCRIPTIVE = (
    "name",
    "status",
    "seeds",
    "n",
    "epoch",
    "backbone",
    "dense",
    "params_total_m",
    "params_active_m",
    "gflops",
)


@dataclass(frozen=True)
class Cell:
    """One printed cell: ``text`` (``± spread``) (``delta``) [``note``], bold or not.

    ``value`` is what "best" compares: a metric's mean rounded as printed (so printed ties are
    all bold), NaN for anything else. ``note`` says why a pivot cell holds less than every seed
    (a pivot has no status column).
    """

    text: str
    spread: str | None = None
    delta: str | None = None
    value: float = math.nan
    bold: bool = False
    note: str | None = None


@dataclass(frozen=True)
class Column:
    """A heading, its alignment, and whether higher (``max``) or lower (``min``) is bold."""

    heading: str
    numeric: bool
    best: Literal["max", "min"] | None = None


@dataclass(frozen=True)
class Block:
    """Rows shown together: one group of ``group_by`` (``label``), or the whole table (None)."""

    label: str | None
    rows: list[list[Cell]] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    """A table before it is written out in one format."""

    columns: list[Column]
    blocks: list[Block]


def render(results: pd.DataFrame, table: TableSpec, format: Format) -> str:
    """The result table as text in ``format`` (``md``, ``latex``, ``csv`` or ``html``).

    Args:
        results: one row per trial, as :func:`orchestrator.results.collect` returns.
        table: the study's ``table:`` section.
        format: ``md`` GitHub Markdown; ``latex`` a booktabs ``tabular``; ``csv`` every
            configuration column and the shown metrics' ``_mean``/``_std`` (and ``_delta``) at full
            precision; ``html`` one ``<table>`` to embed in a page.

    Raises:
        ValueError: the table names an axis the study does not have, or a pivot puts two
            configurations in one cell.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown table format {format!r}; use one of {', '.join(FORMATS)}")
    frame = configurations(results, table)
    if format == "csv":
        return csv_frame(frame, table).to_csv(index=False)
    layout = pivot_layout(frame, table) if table.pivot is not None else table_layout(frame, table)
    return _WRITERS[format](layout)


def configurations(results: pd.DataFrame, table: TableSpec) -> pd.DataFrame:
    """One row per configuration (:func:`~orchestrator.results.aggregate`), with deltas to the dense
    baselines when asked, keeping the rows ``table.rows`` selects."""
    pivoted = [table.pivot.value] if table.pivot is not None and table.pivot.value else []
    metrics = list(dict.fromkeys([*metric_columns(results), *table.metrics, *pivoted]))
    frame = aggregate(results, metrics)
    if table.delta_vs_dense:
        # Before filtering: a baseline the rows leave out still anchors the others' deltas.
        frame = with_deltas(frame, metrics)
    return _select(frame, table.rows)


def display_columns(frame: pd.DataFrame, table: TableSpec) -> list[str]:
    """The shown columns of an aggregated frame, as keys: ``name``, ``gflops``, a metric, ``axis.<label>``.

    Default: the paper's layout (name, #params, active #params, GFLOPs, throughput, the table's
    metrics, the OOD top-1 accuracies), each metric only where collected. A status column is
    added whenever a configuration has not FINISHED every seed.
    """
    if table.columns is not None:
        keys = [_column_key(frame, name, table) for name in table.columns]
    else:
        logged = [
            m for m in _aggregated_metrics(frame) if FINAL_METRICS.fullmatch(m) and m not in table.metrics
        ]
        throughput = [m for m in logged if m == "inference_images_per_s"]
        ood = [m for m in logged if m.startswith("ood_") and m.endswith("_top1")]
        keys = ["name", "params_total_m", "params_active_m", "gflops", *throughput, *table.metrics, *ood]
    if "status" not in keys and (frame["status"] != FINISHED).any():
        keys.append("status")
    return keys


def table_layout(frame: pd.DataFrame, table: TableSpec) -> Layout:
    """One row per configuration, grouped by ``table.group_by``."""
    keys = display_columns(frame, table)
    columns = [_column(key) for key in keys]
    blocks = [
        Block(label, _bold_best([[_cell(row, key) for key in keys] for _, row in rows.iterrows()], columns))
        for label, rows in _groups(frame, table.group_by)
    ]
    return Layout(columns, blocks)


def pivot_layout(frame: pd.DataFrame, table: TableSpec) -> Layout:
    """One metric over two axes: a row per value of ``pivot.rows``, a column per value of ``pivot.columns``."""
    assert table.pivot is not None
    value = table.pivot.value or table.metrics[0]
    down, across = _axis_column(frame, table.pivot.rows), _axis_column(frame, table.pivot.columns)
    values = _pivot_values(frame, down, across)
    best = _direction(value)
    columns = [Column(_heading(down), numeric=False)]
    columns += [Column(_value_heading(across, v), numeric=True, best=best) for v in values]
    blocks = []
    for label, rows in _groups(frame, table.group_by):
        lines = [
            [Cell(_line_label(down, key, row)), *(_pivot_cell(cells.get(v), value) for v in values)]
            for key, row, cells in _pivot_lines(rows, down, across, values)
        ]
        blocks.append(Block(label, _bold_best(lines, columns)))
    return Layout(columns, blocks)


def csv_frame(frame: pd.DataFrame, table: TableSpec) -> pd.DataFrame:
    """The machine-readable table: what the configuration is (every descriptive and axis column),
    then ``<m>_mean``, ``<m>_std`` (and ``<m>_delta``) of each shown metric; rows as shown."""
    if table.pivot is not None:
        return _pivot_csv(frame, table)
    groups = [rows for _, rows in _groups(frame, table.group_by)]
    ordered = pd.concat(groups, ignore_index=True) if groups else frame  # no groups: table.rows kept none
    described = [c for c in _CSV_DESCRIPTIVE if c in ordered] + [c for c in ordered if c.startswith("axis.")]
    metrics = [k for k in display_columns(frame, table) if _is_metric(k)]
    stats = [f"{m}_{s}" for m in metrics for s in ("mean", "std", "delta") if f"{m}_{s}" in ordered]
    return ordered[described + stats]


# ---------------------------------------------------------------------------------------------
# Writers


def to_markdown(layout: Layout) -> str:
    """GitHub Markdown: group headings are rows in italics (a pipe table cannot span columns)."""
    width = len(layout.columns)
    body: list[list[str]] = []
    for block in layout.blocks:
        if block.label is not None:
            body.append([f"*{_md_text(block.label)}*", *[""] * (width - 1)])
        body += [[_write_cell(cell, _MD) for cell in row] for row in block.rows]
    headers = [_md_text(column.heading) for column in layout.columns]
    align = ["right" if column.numeric else "left" for column in layout.columns]
    return tabulate(body, headers=headers, tablefmt="pipe", colalign=align, disable_numparse=True) + "\n"


def to_latex(layout: Layout) -> str:
    """A booktabs ``tabular`` (``\\usepackage{booktabs}``), to ``\\input`` inside a ``table``."""
    width = len(layout.columns)
    spec = "".join("r" if column.numeric else "l" for column in layout.columns)
    lines = [
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(_latex_text(column.heading) for column in layout.columns) + r" \\",
        r"\midrule",
    ]
    for index, block in enumerate(layout.blocks):
        if block.label is not None:
            if index:
                lines.append(r"\midrule")
            lines.append(rf"\multicolumn{{{width}}}{{l}}{{\textit{{{_latex_text(block.label)}}}}} \\")
        lines += [" & ".join(_write_cell(cell, _LATEX) for cell in row) + r" \\" for row in block.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_html(layout: Layout) -> str:
    """One ``<table>`` with a ``<tbody>`` per group; pure ASCII (other characters as references), so
    it embeds in a page of any encoding."""
    width = len(layout.columns)
    head = "".join(
        f'<th scope="col"{_align(column)}>{_html_text(column.heading)}</th>' for column in layout.columns
    )
    parts = ['<table class="sweetspot-table">', f"<thead><tr>{head}</tr></thead>"]
    for block in layout.blocks:
        parts.append("<tbody>")
        if block.label is not None:
            label = _html_text(block.label)
            parts.append(f'<tr class="group"><th colspan="{width}" scope="rowgroup">{label}</th></tr>')
        for row in block.rows:
            cells = "".join(
                f"<td{_align(column)}>{_write_cell(cell, _HTML)}</td>"
                for column, cell in zip(layout.columns, row)
            )
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</tbody>")
    parts.append("</table>")
    return "\n".join(parts) + "\n"


_WRITERS: dict[str, Callable[[Layout], str]] = {"md": to_markdown, "latex": to_latex, "html": to_html}


def _md_text(text: str) -> str:
    return text.replace("|", r"\|")  # a bare pipe would end the cell


# LaTeX's special characters, and the non-ASCII ones our cells and headings use.
_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--", "±": r"$\pm$",
    "×10⁶": r"$\times 10^6$", "×": r"$\times$", "Δ": r"$\Delta$",
}  # fmt: skip
_LATEX_PATTERN = re.compile("|".join(re.escape(k) for k in sorted(_LATEX_ESCAPES, key=len, reverse=True)))


def _latex_text(text: str) -> str:
    return _LATEX_PATTERN.sub(lambda match: _LATEX_ESCAPES[match.group()], text)


def _html_text(text: str) -> str:
    return html.escape(text).encode("ascii", "xmlcharrefreplace").decode("ascii")


@dataclass(frozen=True)
class _Dialect:
    """How one format escapes text and writes bold, ± and a delta."""

    escape: Callable[[str], str]
    bold: str
    plus_minus: str
    delta: str


def _write_cell(cell: Cell, dialect: _Dialect) -> str:
    text = dialect.escape(cell.text) + (f"{dialect.plus_minus}{cell.spread}" if cell.spread else "")
    text = dialect.bold.format(text) if cell.bold else text
    delta = dialect.delta.format(cell.delta) if cell.delta else ""
    return text + delta + (f" [{dialect.escape(cell.note)}]" if cell.note else "")


_MD = _Dialect(_md_text, bold="**{}**", plus_minus=" ± ", delta=" ({})")
_LATEX = _Dialect(_latex_text, bold=r"\textbf{{{}}}", plus_minus=r" $\pm$ ", delta=" (${}$)")
_HTML = _Dialect(_html_text, bold="<strong>{}</strong>", plus_minus=" &#177; ", delta=" ({})")


def _align(column: Column) -> str:
    return f' style="text-align:{"right" if column.numeric else "left"}"'


# ---------------------------------------------------------------------------------------------
# Cells


def _column(key: str) -> Column:
    if not _is_metric(key):
        return Column(_heading(key), numeric=key not in ("name", "status") and not key.startswith("axis."))
    return Column(_heading(key), numeric=True, best=_direction(key))


def _cell(row: pd.Series, key: str) -> Cell:
    if key in ("name", "status"):
        return Cell(str(row[key]))
    if key.startswith("axis."):
        return Cell(_axis_text(key, row[key]))
    if key in CONFIG_COLUMNS:
        value = row[key]
        return Cell(MISSING if missing(value) else f"{value:.{_decimals(key, value)}f}")
    return _metric_cell(row, key)


def _metric_cell(row: pd.Series | None, metric: str) -> Cell:
    """``mean`` (``± std`` over two or more seeds) (``delta`` to the dense baseline); a dash for no
    configuration (an empty pivot cell) or no value."""
    mean = math.nan if row is None else row.get(f"{metric}_mean", math.nan)
    if missing(mean):
        return Cell(MISSING)
    digits = _decimals(metric, mean)
    std, delta = row.get(f"{metric}_std", math.nan), row.get(f"{metric}_delta", math.nan)
    return Cell(
        f"{mean:.{digits}f}",
        spread=None if missing(std) else f"{std:.{digits}f}",
        delta=None if missing(delta) else f"{delta:+.{digits}f}",
        value=round(float(mean), digits),
    )


def _pivot_cell(row: pd.Series | None, metric: str) -> Cell:
    cell = _metric_cell(row, metric)
    if row is None or row["status"] == FINISHED:
        return cell
    return replace(cell, note=row["status"])


def _bold_best(rows: list[list[Cell]], columns: list[Column]) -> list[list[Cell]]:
    """Bold the best value of each ranked column (all of them when tied as printed); a column with
    fewer than two values has nothing to be best against."""
    best: dict[int, float] = {}
    for index, column in enumerate(columns):
        values = [row[index].value for row in rows if not math.isnan(row[index].value)]
        if column.best is not None and len(values) > 1:
            best[index] = max(values) if column.best == "max" else min(values)
    return [
        [
            replace(cell, bold=True) if best.get(index) == cell.value else cell
            for index, cell in enumerate(row)
        ]
        for row in rows
    ]


def _decimals(key: str, value: float) -> int:
    """Digits after the point: accuracies 2, throughput 0, params and GFLOPs 1 from 10 up, and
    otherwise three significant digits (a loss of 2.30, a dropped fraction of 0.0123)."""
    if key.endswith("images_per_s"):
        return 0
    if re.search(r"top[15]$", key):
        return 2
    if key in ("params_total_m", "params_active_m", "gflops") and abs(value) >= 10:
        return 1
    if key in ("n", "seeds", "epoch") or value == 0:
        return 0
    return max(0, 2 - math.floor(math.log10(abs(value))))


def _direction(metric: str) -> Literal["max", "min"] | None:
    if metric in UNRANKED:
        return None
    return "min" if lower_is_better(metric) else "max"


def _heading(key: str) -> str:
    if key.startswith("axis."):
        label = key.removeprefix("axis.")
        return AXIS_HEADINGS.get(label, label)
    ood = re.fullmatch(r"ood_(.+)_(top1|top5|loss)", key)
    if ood:
        name, score = ood.groups()
        return f"{OOD_NAMES.get(name, name)} {HEADINGS.get(f'val_{score}', score)}"
    return HEADINGS.get(key, key)


def _axis_text(key: str, value: Any) -> str:
    """An axis value as a table prints it: ``Last 2``, ``no MoE``, ``ViT-S``, ``4``."""
    label = key.removeprefix("axis.")
    if missing(value):
        return MISSING
    if label == "placement":
        return (
            "no MoE"
            if value == "none"
            else placement_label(list(value) if isinstance(value, tuple) else value)
        )
    if label == "backbone" and value in BACKBONES:
        return BACKBONES[value].display
    if isinstance(value, list | tuple):
        return ",".join(_axis_text(key, v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _value_heading(key: str, value: Any) -> str:
    """``mlp_ratio=2``; placements and backbones name themselves (``Last 2``, ``ViT-S``)."""
    label = key.removeprefix("axis.")
    text = _axis_text(key, value)
    return text if label in ("placement", "backbone") else f"{label}={text}"


# ---------------------------------------------------------------------------------------------
# Rows: selection, groups, pivots


def _select(frame: pd.DataFrame, rows: dict[str, Any]) -> pd.DataFrame:
    """The configurations whose axes match every entry of ``rows``; one without a value for the
    axis (an MoE axis of a dense baseline) stays: a filter on experts keeps the baseline."""
    keep = [True] * len(frame)
    for name, wanted in rows.items():
        column = _axis_column(frame, name)
        keep = [k and (missing(v) or _matches(v, wanted)) for k, v in zip(keep, frame[column])]
    return frame[keep].reset_index(drop=True)


def _matches(value: Any, wanted: Any) -> bool:
    return value == wanted or (isinstance(wanted, list) and value in wanted)


def _groups(frame: pd.DataFrame, group_by: str | None) -> list[tuple[str | None, pd.DataFrame]]:
    """Configurations by value of ``group_by``, groups in order of first appearance, rows in study order."""
    if group_by is None:
        return [(None, frame)]
    column = _axis_column(frame, group_by)
    keys = [_key(value) for value in frame[column]]
    groups = []
    for key in dict.fromkeys(keys):
        rows = frame[[k == key for k in keys]]
        groups.append((_group_label(column, rows), rows))
    return groups


def _group_label(column: str, rows: pd.DataFrame) -> str:
    value = rows[column].iloc[0]
    if missing(value):
        dense = "dense" in rows and bool(rows["dense"].all())
        return "no MoE" if dense else f"{column.removeprefix('axis.')}: {MISSING}"
    return _value_heading(column, value)


def _pivot_values(frame: pd.DataFrame, down: str, across: str) -> list[Any]:
    """The columns of a pivot: values of ``across`` in order of first appearance (on placed rows)."""
    placed = [not missing(d) and not missing(a) for d, a in zip(frame[down], frame[across])]
    return list(dict.fromkeys(_key(a) for a, p in zip(frame[across], placed) if p))


def _pivot_lines(
    rows: pd.DataFrame, down: str, across: str, values: list[Any]
) -> list[tuple[Any, pd.Series, dict[Any, pd.Series]]]:
    """The lines of one pivot block, in study order: ``(value of down, a configuration, cells)``.

    A configuration with a value on both axes fills the cell of its line; one without (a dense
    baseline) is a line of its own (value None) with itself in every cell.
    """
    lines: dict[Any, tuple[Any, pd.Series, dict[Any, pd.Series]]] = {}
    for index, row in rows.iterrows():
        d, a = _key(row[down]), _key(row[across])
        if d is None or a is None:
            lines[("own", index)] = (None, row, dict.fromkeys(values, row))
            continue
        _, _, cells = lines.setdefault(("value", d), (d, row, {}))
        if a in cells:
            raise ValueError(
                f"table.pivot: {cells[a]['name']!r} and {row['name']!r} both fall in {_value_heading(down, d)}, "
                f"{_value_heading(across, a)}; keep one with table.rows or split them with table.group_by"
            )
        cells[a] = row
    return list(lines.values())


def _line_label(down: str, key: Any, row: pd.Series) -> str:
    return str(row["name"]) if key is None else _axis_text(down, key)


def _pivot_csv(frame: pd.DataFrame, table: TableSpec) -> pd.DataFrame:
    """One line per pivot line: the group, the value of ``pivot.rows`` (the configuration's name for a
    line of its own), then mean, std and n of the metric in each column."""
    assert table.pivot is not None
    metric = table.pivot.value or table.metrics[0]
    down, across = _axis_column(frame, table.pivot.rows), _axis_column(frame, table.pivot.columns)
    values = _pivot_values(frame, down, across)
    records = []
    for label, rows in _groups(frame, table.group_by):
        for key, row, cells in _pivot_lines(rows, down, across, values):
            record = {"group": label} if table.group_by else {}
            record[down.removeprefix("axis.")] = row["name"] if key is None else row[down]
            for v in values:
                heading = _value_heading(across, v)
                found = cells.get(v)
                for stat in ("mean", "std"):
                    record[f"{metric}_{stat}[{heading}]"] = (
                        math.nan if found is None else found[f"{metric}_{stat}"]
                    )
                record[f"n[{heading}]"] = 0 if found is None else found["n"]
            records.append(record)
    return pd.DataFrame(records)


# ---------------------------------------------------------------------------------------------
# Names


def _axis_column(frame: pd.DataFrame, name: str) -> str:
    """``experts`` or ``model.moe.experts`` → ``axis.experts``; a ValueError when the study lacks it."""
    column = f"axis.{axis_label(resolve_axis(name))}"
    if column not in frame:
        axes = ", ".join(c.removeprefix("axis.") for c in frame.columns if c.startswith("axis."))
        raise ValueError(f"table: {name!r} is not an axis of this study (its axes: {axes or 'none'})")
    return column


def _column_key(frame: pd.DataFrame, name: str, table: TableSpec) -> str:
    """A ``table.columns`` entry as a key; the same precedence as the study check: fixed columns,
    metrics, then axes."""
    if name in CONFIG_COLUMNS or name in table.metrics or FINAL_METRICS.fullmatch(name):
        return name
    return _axis_column(frame, name)


def _is_metric(key: str) -> bool:
    return key not in CONFIG_COLUMNS and not key.startswith("axis.")


def _aggregated_metrics(frame: pd.DataFrame) -> list[str]:
    return [c.removesuffix("_mean") for c in frame.columns if c.endswith("_mean")]


def _key(value: Any) -> Any:
    """An axis value as a dict key: None when missing, a tuple for a list (explicit placements)."""
    if missing(value):
        return None
    return tuple(value) if isinstance(value, list) else value
