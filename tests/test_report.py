"""The study report page (dashboards.report, ``sweetspot report``).

Pure tests build the page from frames shaped like ``orchestrator.results.collect``'s and read it
back with the standard library's HTML parser: escaping, the summary, run links and failures. The
``ray`` test writes the real tiny study's report through the CLI and opens it in headless
Chromium (Debian's package, installed here when absent): a screenshot that is not blank, and the
rendered DOM holds the table, every figure and every trial.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dashboards.report import (
    Report,
    ReportFigure,
    TrialRun,
    figure_caption,
    render_report,
    report_figures,
    run_url,
    trial_counts,
)

# ---- Reading a page back ------------------------------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    """An element of a parsed page: its tag, attributes, children and own text."""

    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def all(self, tag: str, **attrs: str) -> list[Node]:
        """Every descendant ``tag`` whose attributes include ``attrs`` (``class_`` for class)."""
        wanted = {key.rstrip("_"): value for key, value in attrs.items()}
        found = []
        for child in self.children:
            if child.tag == tag and all(child.attrs.get(k) == v for k, v in wanted.items()):
                found.append(child)
            found += child.all(tag, **attrs)
        return found

    def one(self, tag: str, **attrs: str) -> Node:
        (found,) = self.all(tag, **attrs)
        return found

    def content(self) -> str:
        """All the text inside, as a browser shows it (before whitespace collapsing)."""
        return "".join(self.text) + "".join(child.content() for child in self.children)


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {key: value or "" for key, value in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        # Close up to the matching element (HTML lets some end tags be implied).
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        # Text after a child belongs to the parent; kept as a child-less text node in order.
        self.stack[-1].children.append(Node("#text", {}, text=[data]))


def parse(page: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(page)
    builder.close()
    return builder.root


# ---- Data shaped like collect's -----------------------------------------------------------------------------

TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "trainer/loop.py", line 12, in worker\n'
    "    raise ValueError(...)\n"
    "ValueError: data.train_samples is 4001, but embedded_mnist has 4000 training images\n"
)


def trial_row(name: str, seed: int, status: str, top1: float = float("nan")) -> dict:
    """One row of ``collect``'s frame (the columns the report reads)."""
    return {
        "name": name, "seed": seed, "hash": hashlib.sha256(f"{name} {seed}".encode()).hexdigest()[:12], "status": status,
        "epoch": 1 if status == "FINISHED" else 0, "backbone": "vit_mini", "dense": False,
        "params_total_m": 0.3, "params_active_m": 0.2, "gflops": 0.01, "val_top1": top1,
    }  # fmt: skip


def report(rows: list[dict], runs: dict[str, TrialRun] | None = None, **changes: object) -> Report:
    """A page's data with no tables or figures: what the pure tests look at is elsewhere."""
    results = pd.DataFrame(rows)
    base = Report(
        name="tiny",
        description="a study",
        generated=datetime(2025, 5, 6, 7, 8, 9, tzinfo=UTC),
        study_file="studies/tiny.yaml",
        spec_text="name: tiny\n",
        results=results,
        tables=[(None, '<table class="sweetspot-table"></table>')],
        figures=[],
        runs=runs if runs is not None else default_runs(rows),
        tracking_uri="sqlite:///runs/tiny/mlflow.db",
        experiment_id="7",
    )
    return replace(base, **changes)


def default_runs(rows: list[dict]) -> dict[str, TrialRun]:
    """A run for each trial that ran: ``run<row index>``."""
    return {row["hash"]: TrialRun(f"run{i}") for i, row in enumerate(rows) if row["status"] != "NOT RUN"}


MIXED = [
    trial_row("ViT-Mini", 0, "FINISHED", 61.5),
    trial_row("ViT-Mini", 1, "FAILED"),
    trial_row("ViT-Mini-4 Last 2 Top 1", 0, "FAILED"),
    trial_row("ViT-Mini-4 Last 2 Top 1", 1, "NOT RUN"),
    trial_row("ViT-Mini-4 Last 2 Top 1", 2, "KILLED"),
]


# ---- Pure tests ---------------------------------------------------------------------------------------------


def test_script_in_the_study_or_in_mlflow_stays_inert_text() -> None:
    attack = "<script>alert('x')</script>"
    rows = [trial_row(f"ViT {attack}", 0, "FAILED")]
    runs = {rows[0]["hash"]: TrialRun(f'"><img src=x onerror=1>{attack}', error=f"RuntimeError: {attack}")}
    page = render_report(
        report(
            rows,
            runs,
            name=f"tiny{attack}",
            description=f"{attack} & more",
            study_file=f"s{attack}.yaml",
            spec_text=f"description: {attack}\n",
        )
    )
    tree = parse(page)
    assert not tree.all("script") and not [img for img in tree.all("img") if "onerror" in img.attrs]
    assert tree.one("h1").content() == f"tiny{attack}"
    assert tree.one("p", class_="description").content() == f"{attack} & more"
    assert tree.one("section", id="spec").one("pre").content() == f"description: {attack}\n"
    assert f"RuntimeError: {attack}" in tree.one("ul", class_="failures").content()
    assert f"ViT {attack}" in tree.one("table", class_="sweetspot-trials").content()


def test_failures_list_each_failed_trial_with_the_last_line_of_its_error() -> None:
    runs = {
        MIXED[1]["hash"]: TrialRun("r1", error=TRACEBACK),
        MIXED[2]["hash"]: TrialRun("r2", error=None),  # failed before the error could be recorded
    }
    tree = parse(render_report(report(MIXED, runs)))
    items = tree.one("ul", class_="failures").all("li")
    assert len(items) == 2
    first, second = items
    assert "ViT-Mini, seed 1" in first.content()
    reason = first.one("code", class_="error").content()
    assert reason == "ValueError: data.train_samples is 4001, but embedded_mnist has 4000 training images"
    assert first.one("details").one("pre").content() == TRACEBACK  # the whole text, one click away
    assert "ViT-Mini-4 Last 2 Top 1, seed 0" in second.content()
    assert "no error text was recorded" in second.content()


def test_a_study_without_failures_says_so() -> None:
    tree = parse(render_report(report([trial_row("ViT-Mini", 0, "FINISHED", 60.0)])))
    assert tree.one("section", id="failures").one("p").content() == "No trial failed."


def test_summary_counts_done_failed_and_not_run_and_any_other_state() -> None:
    assert trial_counts(pd.DataFrame(MIXED)) == {"done": 1, "failed": 2, "not run": 1, "interrupted": 1}
    assert trial_counts(pd.DataFrame([trial_row("a", 0, "FINISHED")])) == {
        "done": 1,
        "failed": 0,
        "not run": 0,
    }
    summary = parse(render_report(report(MIXED))).one("p", class_="summary").content()
    assert summary == "5 trials in 2 configurations: 1 done, 2 failed, 1 not run, 1 interrupted."


def test_trials_link_to_their_runs_on_an_mlflow_server() -> None:
    runs = default_runs(MIXED)
    page = render_report(report(MIXED, runs, tracking_uri="https://mlflow.example.org/"))
    rows = parse(page).one("table", class_="sweetspot-trials").one("tbody").all("tr")
    assert [row.attrs["data-hash"] for row in rows] == [row["hash"] for row in MIXED]  # study order
    links = {row.attrs["data-hash"]: [a.attrs["href"] for a in row.all("a")] for row in rows}
    for row in MIXED:
        run = runs.get(row["hash"])
        assert links[row["hash"]] == (
            [run_url("https://mlflow.example.org/", "7", run.run_id)] if run else []
        )
    assert (
        run_url("https://mlflow.example.org/", "7", "run0")
        == "https://mlflow.example.org/#/experiments/7/runs/run0"
    )


def test_a_local_store_shows_each_run_id_and_how_to_open_the_ui() -> None:
    tree = parse(render_report(report(MIXED)))
    section = tree.one("section", id="trials")
    assert not section.all("a")  # nothing serves a sqlite file
    assert "sweetspot ui studies/tiny.yaml" in section.one("p", class_="note").content()
    cells = [row.all("td")[-1].content() for row in section.one("tbody").all("tr")]
    assert cells == ["run0", "run1", "run2", "–", "run4"]  # a trial that never ran has no run


def test_every_figure_is_captioned_with_what_it_shows(tmp_path: Path) -> None:
    names = {"0123456789ab": "ViT-Mini-4 Last 2 Top 1, seed 0"}
    group, title, caption = figure_caption("pareto", names, "Top-1 (%)")
    assert (group, title) == ("Study", "Pareto front") and caption.startswith(
        "Top-1 (%) against active parameters"
    )
    group, title, caption = figure_caption("routing/0123456789ab/spatial_map_block3", names, "Top-1 (%)")
    assert group == "Routing of ViT-Mini-4 Last 2 Top 1, seed 0" and title == "Spatial map, block3"
    assert "layer block3" in caption and caption.endswith("Trial: ViT-Mini-4 Last 2 Top 1, seed 0.")
    # Only the PNGs are embedded; the SVG twins are for papers.
    png = Image.new("RGB", (4, 3), "red")
    for stem in ("pareto", "routing/0123456789ab/patch_cdf"):
        (tmp_path / stem).parent.mkdir(parents=True, exist_ok=True)
        png.save(tmp_path / f"{stem}.png")
        (tmp_path / f"{stem}.svg").write_text("<svg/>")
    paths = [
        tmp_path / "pareto.png",
        tmp_path / "pareto.svg",
        tmp_path / "routing/0123456789ab/patch_cdf.png",
    ]
    results = pd.DataFrame([{**trial_row("ViT-Mini-4 Last 2 Top 1", 0, "FINISHED"), "hash": "0123456789ab"}])
    figures = report_figures(paths, tmp_path, results)
    assert [(f.key, f.group, f.title) for f in figures] == [
        ("pareto", "Study", "Pareto front"),
        (
            "routing/0123456789ab/patch_cdf",
            "Routing of ViT-Mini-4 Last 2 Top 1, seed 0",
            "Patches per expert",
        ),
    ]
    section = parse(render_report(report(MIXED, figures=figures))).one("section", id="figures")
    assert [h.content() for h in section.all("h3")] == ["Study", "Routing of ViT-Mini-4 Last 2 Top 1, seed 0"]
    for figure in section.all("figure"):
        assert figure.one("figcaption").content().startswith(figure.one("img").attrs["alt"])
        assert decoded_png(figure.one("img").attrs["src"]).size == (4, 3)


def test_the_page_needs_nothing_outside_itself() -> None:
    figure = ReportFigure("pareto", "Study", "Pareto front", "What it shows.", _png_bytes())
    tree = parse(render_report(report(MIXED, figures=[figure])))
    assert not tree.all("link") and not tree.all("script")
    sources = [img.attrs["src"] for img in tree.all("img")]
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), "blue").save(buffer, format="PNG")
    return buffer.getvalue()


# The routing figures of one trial, besides one spatial map per MoE layer (tests/test_figures.py).
ROUTING_STEMS = ["class_experts", "expert_similarity", "experts_per_image", "patch_cdf"]


def decoded_png(src: str) -> Image.Image:
    """The image of a ``data:image/png;base64,`` URI, fully decoded (a truncated PNG raises)."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(src.removeprefix(prefix), validate=True)))
    assert image.format == "PNG"
    image.load()
    return image


# ---- The real study in a real browser -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Iterator[str]:
    """Headless Chromium: from PATH, else Debian's package, installed now (as root, with apt)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        found = _install_chromium()
    yield found


def _install_chromium() -> str:
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed, and installing it with apt-get needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
    ):
        done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            pytest.skip(
                f"could not install chromium ({' '.join(command)}): {lines[-1] if lines else done.returncode}"
            )
    found = shutil.which("chromium")
    assert found is not None, "apt-get installed chromium, but it is not on PATH"
    return found


def headless(chromium: str, profile: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Chromium without a display, sandbox (we may be root) or GPU, in a throwaway profile."""
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", *arguments,
    ]  # fmt: skip
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.ray
def test_report_opens_in_headless_chromium_with_the_table_every_figure_and_trial(
    tiny_study, chromium: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from orchestrator.results import collect

    page = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(tiny_study.path), "-o", str(page)])
    assert result.exit_code == 0, result.output
    assert f"wrote {page}" in result.output

    screenshot = tmp_path / "screenshot.png"
    headless(
        chromium, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,2000", page.as_uri()
    )
    with Image.open(screenshot) as image:
        assert image.size == (1280, 2000)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 1, "the screenshot is blank"

    dom = headless(chromium, tmp_path / "profile", "--dump-dom", page.as_uri()).stdout
    tree = parse(dom)
    assert tree.one("h1").content() == "tiny"
    assert tree.one("p", class_="description").content() == tiny_study.spec.description

    # The result table: one row per configuration (the tiny study's dense baseline and 4 MoE ones).
    results = collect(tiny_study.trials, tiny_study.store, tiny_study.spec.table.metrics)
    table = tree.one("section", id="results").one("table", class_="sweetspot-table")
    names = [row.all("td")[0].content() for row in table.one("tbody").all("tr")]
    assert names == list(dict.fromkeys(results["name"])) and len(names) == 5

    # Every figure of the study, each a PNG that decodes: the Pareto front and the heatmap, then
    # 6 routing figures for each MoE configuration (its first seed), as `sweetspot figures` draws them.
    stems = [*ROUTING_STEMS, "spatial_map_block3", "spatial_map_block5"]
    moe = [t for t in tiny_study.trials if not t.config.model.is_dense and t.seed == 0]
    expected = {"pareto", "experts_mlp_ratio", *(f"routing/{t.short_hash}/{stem}" for t in moe for stem in stems)}
    shown = tree.one("section", id="figures").all("figure", class_="sweetspot-figure")
    assert [figure.attrs["data-figure"] for figure in shown][:2] == ["pareto", "experts_mlp_ratio"]
    assert {figure.attrs["data-figure"] for figure in shown} == expected and len(shown) == 26
    for figure in shown:
        (image,) = figure.all("img")
        width, height = decoded_png(image.attrs["src"]).size
        assert width > 100 and height > 100
        assert figure.one("figcaption").content().strip()

    # One row per trial, each with its MLflow run; no failures; the study file verbatim.
    runs = tiny_study.store.trial_runs()
    trials = tree.one("table", class_="sweetspot-trials").one("tbody").all("tr")
    assert [row.attrs["data-hash"] for row in trials] == [t.short_hash for t in tiny_study.trials]
    for row, trial in zip(trials, tiny_study.trials, strict=True):
        assert row.all("td")[-1].content() == runs[trial.hash].run_id
    assert tree.one("section", id="failures").one("p").content() == "No trial failed."
    # (A browser drops the newline that opens a <pre>: the study file's first line is blank.)
    assert tree.one("section", id="spec").one("pre").content().strip() == tiny_study.path.read_text().strip()
    summary = tree.one("p", class_="summary").content()
    assert summary == "10 trials in 5 configurations: 10 done, 0 failed, 0 not run."


@pytest.mark.ray
def test_a_pivot_table_comes_with_the_plain_table(tiny_study) -> None:
    from dashboards.report import result_tables
    from orchestrator.results import collect
    from orchestrator.spec import PivotSpec

    results = collect(tiny_study.trials, tiny_study.store, tiny_study.spec.table.metrics)
    table = tiny_study.spec.table.model_copy(
        update={"pivot": PivotSpec(rows="experts", columns="mlp_ratio", value="val_top1")}
    )
    (pivot_heading, pivot), (plain_heading, plain) = result_tables(results, table)
    assert pivot_heading == "Top-1 (%) by experts × mlp_ratio" and plain_heading == "Every configuration"
    # The pivot: the dense baseline's row and one per number of experts; the plain table: every configuration.
    assert len(parse(pivot).one("tbody").all("tr")) == 3
    assert len(parse(plain).one("tbody").all("tr")) == 5
