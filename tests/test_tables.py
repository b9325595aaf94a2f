"""Paper-style result tables from the MLflow runs of a real study (the session's ``tiny_study``:
5 configurations, one of them dense, × 2 seeds): seeds aggregated to mean ± std, the best value in
bold, Markdown / LaTeX (booktabs) / CSV / HTML, groups, pivots, deltas to the dense baseline, and
the ``table:`` section of a study file, checked where a study is loaded."""

from __future__ import annotations

import io
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dashboards.tables import render
from orchestrator.cli import app
from orchestrator.results import aggregate, collect, status_summary
from orchestrator.source import StudyError
from orchestrator.spec import PivotSpec, TableSpec, load_study

DENSE = "ViT-Mini"
MOE = [f"ViT-Mini-{e} Last 2 Top 1, mlp_ratio={r}" for e in (2, 4) for r in (1, 2)]


# ---------------------------------------------------------------------------------------------
# Helpers


def per_trial(study: Any) -> pd.DataFrame:
    return collect(study.trials, study.store, study.spec.table.metrics)


def run_values(study: Any, metric: str) -> dict[str, list[float]]:
    """Configuration name → the metric of its FINISHED MLflow runs, read straight from MLflow."""
    values: dict[str, list[float]] = {}
    for run in study.store.runs():
        if run.info.status == "FINISHED":
            values.setdefault(run.data.tags["sweetspot.trial_name"], []).append(run.data.metrics[metric])
    return values


def md_rows(text: str) -> list[list[str]]:
    """The body cells of a Markdown pipe table (header and rule dropped)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.strip().splitlines()[2:]]


def md_header(text: str) -> list[str]:
    return [c.strip() for c in text.splitlines()[0].strip().strip("|").split("|")]


def shown(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def variant(study: Any, folder: Path, table: str) -> Path:
    """The same study (same store, same trials) with another ``table:`` section."""
    text = study.path.read_text().split("\ntable:")[0] + "\ntable:\n" + table
    path = folder / "variant.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Aggregation against the MLflow runs


@pytest.mark.ray
def test_each_configuration_is_the_mean_and_sample_std_of_its_seeds_runs(tiny_study: Any) -> None:
    configurations = aggregate(per_trial(tiny_study))
    assert list(configurations["name"]) == [DENSE, *MOE]  # study order
    runs = run_values(tiny_study, "val_top1")
    for _, row in configurations.iterrows():
        values = np.array(runs[row["name"]])
        assert len(values) == row["n"] == row["seeds"] == 2 and row["status"] == "FINISHED"
        assert row["val_top1_mean"] == pytest.approx(values.mean())
        assert row["val_top1_std"] == pytest.approx(values.std(ddof=1))
    dense = configurations.iloc[0]
    assert dense["dense"] and dense["axis.placement"] == "none" and dense["axis.experts"] is None
    assert dense["params_total_m"] == pytest.approx(dense["params_active_m"])


@pytest.mark.ray
def test_metrics_logged_after_training_are_collected_without_being_listed(tiny_study: Any) -> None:
    frame = per_trial(tiny_study)
    assert "inference_images_per_s" not in tiny_study.spec.table.metrics
    assert frame["inference_images_per_s"].gt(0).all()
    assert not [c for c in frame.columns if c.startswith("ood_")]  # the study scores no OOD set


# ---------------------------------------------------------------------------------------------
# Markdown


@pytest.mark.ray
def test_markdown_shows_the_paper_columns_mean_std_and_the_best_top1_in_bold(tiny_study: Any) -> None:
    text = render(per_trial(tiny_study), tiny_study.spec.table, "md")
    header = md_header(text)
    assert header[:5] == [
        "Architecture",
        "#Params (×10⁶)",
        "Active #Params (×10⁶)",
        "GFLOPs",
        "Throughput (im/s)",
    ]
    assert "Top-1 (%)" in header and "Status" not in header  # every seed finished
    rows = md_rows(text)
    assert [row[0] for row in rows] == [DENSE, *MOE]
    top1 = header.index("Top-1 (%)")
    runs = run_values(tiny_study, "val_top1")
    means = {name: round(float(np.mean(v)), 2) for name, v in runs.items()}
    best = max(means.values())
    for row in rows:
        values = np.array(runs[row[0]])
        cell = shown(values.mean(), values.std(ddof=1))
        assert row[top1] == (f"**{cell}**" if means[row[0]] == best else cell)


@pytest.mark.ray
def test_a_filter_keeps_the_matching_configurations_and_the_dense_baseline(tiny_study: Any) -> None:
    text = render(per_trial(tiny_study), TableSpec(rows={"experts": 4, "model.moe.mlp_ratio": [1, 2]}), "md")
    assert [row[0] for row in md_rows(text)] == [DENSE, *MOE[2:]]


@pytest.mark.ray
def test_groups_are_separated_and_the_best_is_bold_in_each(tiny_study: Any) -> None:
    text = render(per_trial(tiny_study), TableSpec(group_by="experts"), "md")
    rows = md_rows(text)
    assert [row[0] for row in rows] == ["*no MoE*", DENSE, "*experts=2*", *MOE[:2], "*experts=4*", *MOE[2:]]
    top1 = md_header(text).index("Top-1 (%)")
    for group in (rows[3:5], rows[6:8]):
        assert sum(row[top1].startswith("**") for row in group) >= 1
    assert not rows[1][top1].startswith("**")  # alone in its group: nothing to be best against


@pytest.mark.ray
def test_delta_vs_dense_is_each_mean_minus_the_dense_baselines(tiny_study: Any) -> None:
    table = TableSpec(delta_vs_dense=True)
    csv = pd.read_csv(io.StringIO(render(per_trial(tiny_study), table, "csv")))
    runs = run_values(tiny_study, "val_top1")
    dense = np.mean(runs[DENSE])
    assert math.isnan(csv.loc[0, "val_top1_delta"])
    for index, name in enumerate(MOE, start=1):
        assert csv.loc[index, "val_top1_delta"] == pytest.approx(np.mean(runs[name]) - dense)
    md = md_rows(render(per_trial(tiny_study), table, "md"))
    assert md[1][-1].endswith(f"({np.mean(runs[MOE[0]]) - dense:+.2f})")


# ---------------------------------------------------------------------------------------------
# LaTeX, CSV, HTML


@pytest.mark.ray
def test_latex_is_a_booktabs_tabular_with_escaped_names(tiny_study: Any) -> None:
    text = render(
        per_trial(tiny_study), TableSpec(metrics=["val_top1", "val_top5"], group_by="experts"), "latex"
    )
    lines = text.strip().splitlines()
    assert lines[0].startswith(r"\begin{tabular}{l") and lines[-1] == r"\end{tabular}"
    assert lines[1] == r"\toprule" and lines[-2] == r"\bottomrule" and lines[3] == r"\midrule"
    assert text.count(r"\toprule") == text.count(r"\bottomrule") == 1
    assert text.count(r"\midrule") == 3  # under the header, then between the three groups
    assert r"\#Params ($\times 10^6$)" in lines[2] and r"Top-1 (\%)" in lines[2]
    assert r"ViT-Mini-2 Last 2 Top 1, mlp\_ratio=1 &" in text and "mlp_ratio" not in text
    assert r"\multicolumn{7}{l}{\textit{experts=2}} \\" in text
    assert r"\textbf{" in text and r" $\pm$ " in text
    body = [line for line in lines if line.endswith(r"\\") and r"\multicolumn" not in line]
    assert all(line.count(" & ") == 6 for line in body)  # 7 columns in every row


@pytest.mark.ray
def test_csv_round_trips_with_pandas_at_full_precision(tiny_study: Any) -> None:
    results = per_trial(tiny_study)
    text = render(results, tiny_study.spec.table, "csv")
    back = pd.read_csv(io.StringIO(text))
    expected = aggregate(results)
    assert list(back["name"]) == [DENSE, *MOE] and list(back["n"]) == [2] * 5
    for metric in ("val_top1", "val_top5", "images_per_s", "inference_images_per_s"):
        assert back[f"{metric}_mean"].tolist() == expected[f"{metric}_mean"].tolist()  # exact: no rounding
        assert back[f"{metric}_std"].tolist() == expected[f"{metric}_std"].tolist()
    runs = run_values(tiny_study, "val_top5")
    assert back.loc[1, "val_top5_mean"] == pytest.approx(np.mean(runs[MOE[0]]))


@pytest.mark.ray
def test_html_is_one_well_formed_ascii_table(tiny_study: Any) -> None:
    text = render(per_trial(tiny_study), TableSpec(group_by="experts"), "html")
    assert text.isascii()
    table = ET.fromstring(text)  # well-formed: embeds in any page
    assert table.tag == "table" and len(table.findall("tbody")) == 3
    headings = [th.text for th in table.find("thead").iter("th")]
    assert headings[0] == "Architecture" and "Top-1 (%)" in headings
    names = [tr.find("td").text for tr in table.iter("tr") if tr.find("td") is not None]
    assert names == [DENSE, *MOE]
    assert table.findall(".//strong")


# ---------------------------------------------------------------------------------------------
# Pivot


@pytest.mark.ray
def test_pivot_lays_out_experts_against_mlp_ratio(tiny_study: Any) -> None:
    table = TableSpec(pivot=PivotSpec(rows="experts", columns="mlp_ratio", value="val_top1"))
    text = render(per_trial(tiny_study), table, "md")
    assert md_header(text) == ["# Experts", "mlp_ratio=1", "mlp_ratio=2"]
    runs = run_values(tiny_study, "val_top1")
    cell = {name: shown(np.mean(v), np.std(v, ddof=1)) for name, v in runs.items()}
    rows = [[c.strip("*") for c in row] for row in md_rows(text)]
    assert rows == [
        [DENSE, cell[DENSE], cell[DENSE]],  # the dense baseline across every column
        ["2", cell[MOE[0]], cell[MOE[1]]],
        ["4", cell[MOE[2]], cell[MOE[3]]],
    ]
    for column in (1, 2):  # one best per column
        assert sum(row[column].startswith("**") for row in md_rows(text)) >= 1
    back = pd.read_csv(io.StringIO(render(per_trial(tiny_study), table, "csv")))
    assert back.loc[2, "val_top1_mean[mlp_ratio=2]"] == pytest.approx(np.mean(runs[MOE[3]]))
    assert list(back["n[mlp_ratio=1]"]) == [2, 2, 2]


@pytest.mark.ray
def test_a_pivot_with_two_configurations_in_one_cell_is_an_error(tiny_study: Any) -> None:
    table = TableSpec(pivot=PivotSpec(rows="experts", columns="placement"))
    with pytest.raises(ValueError, match="both fall in experts=2, Last 2"):
        render(per_trial(tiny_study), table, "md")


# ---------------------------------------------------------------------------------------------
# Unfinished configurations (the real runs, some marked otherwise)


@pytest.mark.ray
def test_unfinished_configurations_are_shown_with_their_status_and_count_only_finished_seeds(
    tiny_study: Any,
) -> None:
    results = per_trial(tiny_study)
    results.loc[results["name"] == MOE[0], "status"] = ["FINISHED", "FAILED"]
    results.loc[results["name"] == MOE[1], "status"] = "NOT RUN"
    configurations = aggregate(results)
    partial, never = configurations.iloc[1], configurations.iloc[2]
    assert partial["status"] == "1/2 finished, 1 failed" and partial["n"] == 1
    assert partial["val_top1_mean"] == results.loc[results["name"] == MOE[0], "val_top1"].iloc[0]
    assert math.isnan(partial["val_top1_std"])
    assert never["status"] == "NOT RUN" and never["n"] == 0 and math.isnan(never["val_top1_mean"])
    text = render(results, tiny_study.spec.table, "md")
    assert md_header(text)[-1] == "Status"
    rows = md_rows(text)
    assert rows[1][-1] == "1/2 finished, 1 failed" and " ± " not in rows[1][-2]
    assert rows[2][-1] == "NOT RUN" and rows[2][md_header(text).index("Top-1 (%)")] == "–"
    pivot = render(results, TableSpec(pivot=PivotSpec(rows="experts", columns="mlp_ratio")), "md")
    assert "[1/2 finished, 1 failed]" in pivot and "– [NOT RUN]" in pivot


@pytest.mark.ray
def test_a_configuration_with_a_seed_stopped_early_says_so(tiny_study: Any) -> None:
    results = per_trial(tiny_study)
    assert not results["stopped_early"].any()  # the tiny study stops nothing early
    results.loc[results["name"] == MOE[0], "stopped_early"] = [False, True]
    configurations = aggregate(results)
    assert configurations.iloc[1]["status"] == "FINISHED, 1 stopped early"
    assert configurations.iloc[1]["n"] == 2  # its numbers still count, marked
    rows = md_rows(render(results, tiny_study.spec.table, "md"))
    assert rows[1][-1] == "FINISHED, 1 stopped early" and rows[0][-1] == "FINISHED"


def test_status_summary_counts_each_kind_of_seed() -> None:
    assert status_summary(["FINISHED", "FINISHED"]) == "FINISHED"
    assert status_summary(["FAILED"]) == "FAILED"
    assert (
        status_summary(["FAILED", "FINISHED", "NOT RUN", "RUNNING"])
        == "1/4 finished, 1 running, 1 failed, 1 not run"
    )
    assert status_summary(["KILLED", "RUNNING"]) == "0/2 finished, 1 running, 1 killed"


# ---------------------------------------------------------------------------------------------
# The CLI and the study file


@pytest.mark.ray
@pytest.mark.parametrize("format", ["md", "latex", "csv", "html"])
def test_table_command_prints_every_format(tiny_study: Any, format: str) -> None:
    result = CliRunner().invoke(app, ["table", str(tiny_study.path), "-f", format])
    assert result.exit_code == 0, result.output
    assert result.output == render(per_trial(tiny_study), tiny_study.spec.table, format)


@pytest.mark.ray
def test_table_command_follows_the_study_files_table_section(tiny_study: Any, tmp_path: Path) -> None:
    path = variant(
        tiny_study,
        tmp_path,
        "  metrics: [val_top1]\n  columns: [name, experts, mlp_ratio, n, val_top1]\n  rows: {placement: last2}\n",
    )
    output = tmp_path / "table.tex"
    result = CliRunner().invoke(app, ["table", str(path), "-f", "latex", "-o", str(output)])
    assert result.exit_code == 0, result.output
    text = output.read_text()
    assert r"Architecture & \# Experts & MLP ratio & n & Top-1 (\%) \\" in text
    assert DENSE + " &" not in text and r"ViT-Mini-4 Last 2 Top 1, mlp\_ratio=2 & 4 & 2 & 2 &" in text


@pytest.mark.ray
def test_table_command_reports_a_pivot_it_cannot_lay_out(tiny_study: Any, tmp_path: Path) -> None:
    path = variant(
        tiny_study, tmp_path, "  metrics: [val_top1]\n  pivot: {rows: experts, columns: placement}\n"
    )
    result = CliRunner().invoke(app, ["table", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "both fall in experts=2, Last 2" in result.output


STUDY = """name: tables
grid:
  placement: [none, last2]
  experts: [4, 8]
table:
{table}
"""


def load_table(tmp_path: Path, table: str) -> TableSpec:
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(table=table))
    return load_study(path)[0].table


def problems(tmp_path: Path, table: str) -> list[str]:
    with pytest.raises(StudyError) as caught:
        load_table(tmp_path, table)
    return [f"{p.line}|{p.field}|{p.reason}" for p in caught.value.problems]


def test_table_section_defaults_keep_a_plain_study_valid(tmp_path: Path) -> None:
    table = load_table(tmp_path, "  metrics: [val_top1]")
    assert table == TableSpec()
    assert (table.columns, table.rows, table.group_by, table.delta_vs_dense, table.pivot) == (
        None,
        {},
        None,
        False,
        None,
    )


def test_table_section_names_axes_by_short_or_dotted_path(tmp_path: Path) -> None:
    table = load_table(
        tmp_path,
        "  metrics: [val_top1, val_loss]\n  columns: [name, model.moe.experts, val_loss, ood_v2_top1]\n"
        "  rows: {experts: [4, 8]}\n  group_by: placement\n  delta_vs_dense: true\n"
        "  pivot: {rows: model.moe.experts, columns: placement, value: val_loss}",
    )
    assert table.pivot == PivotSpec(rows="model.moe.experts", columns="placement", value="val_loss")
    assert table.group_by == "placement" and table.delta_vs_dense


def test_table_section_errors_name_the_line_and_field(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        "  metrics: [val_top1]\n"  # line 6
        "  columns: [name, val_top5]\n"
        "  rows: {experts: 16, router: linear}\n"
        "  group_by: mlp_ratio\n"
        "  pivot: {rows: experts, columns: model.moe.experts}",
    )
    assert found[0].startswith("7|table.columns[1]|unknown column 'val_top5'")
    assert found[1:] == [
        "8|table.rows.experts|16 is not a value of 'experts' in this study (4, 8)",
        "8|table.rows.router|'router' is not an axis of this study (its axes: placement, experts)",
        "9|table.group_by|'mlp_ratio' is not an axis of this study (its axes: placement, experts)",
        "10|table.pivot.columns|rows and columns need two different axes",
    ]


def test_an_unknown_table_key_is_refused(tmp_path: Path) -> None:
    assert problems(tmp_path, "  metrics: [val_top1]\n  group: experts") == [
        "7|table.group|unknown field 'group'; did you mean 'group_by'?"
    ]


def test_no_table_command_for_a_study_never_run(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    study = STUDY.format(table="  metrics: [val_top1]").replace("name: tables", "name: never")
    path.write_text(study + f"output: {tmp_path / 'out'}\n")
    result = CliRunner().invoke(app, ["table", str(path), "-f", "html"])
    assert result.exit_code == 1 and "no results for study 'never' yet" in result.output
    assert not (tmp_path / "out").exists()


def test_latex_escapes_every_special_character() -> None:
    from dashboards.tables import _latex_text

    assert _latex_text(r"a_b 5% R&D #1 $x {y} ~ ^ \ – ±") == (
        r"a\_b 5\% R\&D \#1 \$x \{y\} \textasciitilde{} \textasciicircum{} \textbackslash{} -- $\pm$"
    )


def test_lower_is_better_is_decided_by_the_metric_name() -> None:
    from dashboards.tables import _direction

    assert [_direction(m) for m in ("val_top1", "ood_a_top1", "inference_images_per_s")] == ["max"] * 3
    assert [_direction(m) for m in ("val_loss", "dropped_fraction", "expert_load_cv", "top1_error")] == [
        "min"
    ] * 4
    assert _direction("experts_per_image") is None


def test_a_pipe_in_a_name_does_not_end_its_markdown_cell() -> None:
    from dashboards.tables import _md_text

    assert _md_text("a | b") == "a \\| b"  # the escape GitHub's tables expect
