"""Security: no credentials in what sweetspot prints or writes to MLflow and reports, study YAML
read as plain data only, and nothing written outside the folders the platform names.

Real commands (a CLI process, real MLflow sqlite stores, real figure files); no Ray.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_figures import frame, synthetic_analysis, trial_row
from typer.testing import CliRunner

from dashboards.figures import spatial_map_figures, write_study_figures
from dashboards.report import write_report
from orchestrator.cli import _mlflow_hint, app
from orchestrator.expand import expand
from orchestrator.launch import _payload, _tune_trial_dir
from orchestrator.lineage import train_run_name
from orchestrator.redact import redact
from orchestrator.results import collect
from orchestrator.source import MAX_VALUES
from orchestrator.spec import load_study
from orchestrator.tags import TAG_ERROR
from orchestrator.tracking import StudyStore

SECRET = "s3cr3t-Pa55"

# ---- Redaction --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://user:pass@host:5000", "http://user:***@host:5000"),
        ("https://alice:s3cr3t@mlflow.example.org/", "https://alice:***@mlflow.example.org/"),
        ("postgresql://user:pass@db/mlflow", "postgresql://user:***@db/mlflow"),
        ("postgresql+psycopg2://u:p%40ss@db:5432/mlflow?sslmode=require",
         "postgresql+psycopg2://u:***@db:5432/mlflow?sslmode=require"),
        ("s3://AKIAEXAMPLE:abc/def+ghi@bucket/studies", "s3://AKIAEXAMPLE:***@bucket/studies"),
        ("https://ghp_token123@github.com/org/repo", "https://***@github.com/org/repo"),
        ("https://host/api?token=abc123&x=1", "https://host/api?token=***&x=1"),
        ("https://host/?a=1&password=hunter2#frag", "https://host/?a=1&password=***#frag"),
        ("https://acct.blob.core.windows.net/c?sv=2020&sig=XYZ%2F&se=1",
         "https://acct.blob.core.windows.net/c?sv=2020&sig=***&se=1"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=beef",
         "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***"),
        ("host=db user=u password=secret dbname=m", "host=db user=u password=*** dbname=m"),
        ("failed: see http://a:b@h:1/x and s3://k:s@b.", "failed: see http://a:***@h:1/x and s3://k:***@b."),
    ],
)  # fmt: skip
def test_redact_hides_credentials_in_uris(text: str, shown: str) -> None:
    assert redact(text) == shown


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:////tmp/study/mlflow.db",
        "http://127.0.0.1:5000/#/experiments/3",
        "file:///home/me/mlruns",
        "s3://bucket/studies",
        "ray://head:10001",
        "design=wide, lr=0.003, top_k=2",
        "ConvNeXt-T-8 Last 2 Top 1, mlp_ratio=2",
    ],
)
def test_redact_leaves_text_without_credentials_as_it_was(text: str) -> None:
    assert redact(text) == text


def test_the_mlflow_hint_shows_no_password() -> None:
    study = Path("studies/demo.yaml")
    assert (
        _mlflow_hint(study, f"http://alice:{SECRET}@mlflow:5000/", "7")
        == "http://alice:***@mlflow:5000/#/experiments/7"
    )
    hint = _mlflow_hint(study, f"postgresql://alice:{SECRET}@db/mlflow", "7")
    assert SECRET not in hint and "postgresql://alice:***@db/mlflow" in hint


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_credentialed_tracking_server_is_one_redacted_line(tmp_path: Path) -> None:
    study = tmp_path / "secret.yaml"
    study.write_text("name: secret\n")
    uri = f"http://alice:{SECRET}@127.0.0.1:{closed_port()}"
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "status", str(study), "--tracking-uri", uri],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, **env}, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert SECRET not in output and "Traceback" not in output
    assert output.startswith("error MLflow: ") and "http://alice:***@127.0.0.1:" in output
    assert len(output.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["plan", "table", "figures", "report", "ui"])
def test_every_command_that_reads_mlflow_keeps_the_password_out(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "secret.yaml"
    study.write_text("name: secret\n")
    uri = f"http://alice:{SECRET}@127.0.0.1:{closed_port()}"
    result = CliRunner().invoke(app, [command, str(study), "--tracking-uri", uri])
    assert result.exit_code == 2, result.output
    assert SECRET not in result.output and "Traceback" not in result.output
    assert "alice:***@" in result.output


def test_mlflow_params_tags_and_error_texts_hold_no_credentials(tmp_path: Path) -> None:
    study = tmp_path / "secret.yaml"
    study.write_text(
        "name: secret\n"
        f"description: data from https://data.example.org/?token={SECRET}\n"
        f"base: {{data: {{dataset: folder, root: 's3://AKIAEXAMPLE:{SECRET}@bucket/imagenet', num_classes: 10}}}}\n"
        f"output: {tmp_path / 'out'}\n"
    )
    spec, source = load_study(study)
    [trial] = expand(spec, source)
    store = StudyStore.open(spec)
    parent = store.study_run(spec)
    run_id = store.start_trial(trial, parent)
    store.finish(
        run_id, "FAILED", f"Traceback ...\nOSError: cannot open s3://AKIAEXAMPLE:{SECRET}@bucket/imagenet"
    )
    run = store.client.get_run(run_id)
    assert run.data.params["data.root"] == "s3://AKIAEXAMPLE:***@bucket/imagenet"
    assert all(SECRET not in value for value in [*run.data.params.values(), *run.data.tags.values()])
    assert run.data.tags[TAG_ERROR].endswith("cannot open s3://AKIAEXAMPLE:***@bucket/imagenet")
    error_txt = Path(store.client.download_artifacts(run_id, "error.txt", str(tmp_path)))
    assert SECRET not in error_txt.read_text()
    study_run = store.client.get_run(parent)
    assert all(SECRET not in value for value in study_run.data.tags.values())


def test_the_report_page_shows_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page is made to be mailed: the study file on it, the tracking URI and the errors of runs
    written before redaction existed lose their credentials."""
    monkeypatch.chdir(tmp_path)  # the study's output folder
    study = tmp_path / "secret.yaml"
    study.write_text(
        f"name: secret\ndescription: see https://wiki.example.org/?token={SECRET}\n"
        f"tracking: {{uri: 'http://alice:{SECRET}@mlflow.example.org:5000'}}\n"
    )
    spec, source = load_study(study)
    [trial] = expand(spec, source)
    store = StudyStore.open(spec, f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = store.start_trial(trial, store.study_run(spec))
    store.client.set_tag(
        run_id, TAG_ERROR, f"RuntimeError: s3://AKIAEXAMPLE:{SECRET}@bucket is gone"
    )  # raw, as old runs
    store.client.set_terminated(run_id, "FAILED")
    results = collect([trial], store, spec.table.metrics)
    page = write_report(
        study, spec, [trial], store, results, [], tmp_path, tmp_path / "report.html"
    ).read_text()
    assert SECRET not in page
    assert (
        "http://alice:***@mlflow.example.org:5000" in page and "s3://AKIAEXAMPLE:***@bucket is gone" in page
    )


# ---- YAML: plain data only ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        '!!python/object/apply:os.system ["touch {pwned}"]',
        "!!python/object/apply:subprocess.check_call [[touch, {pwned}]]",
        "!!python/object/new:subprocess.Popen [[touch, {pwned}]]",
        "!!python/name:os.system",
        "!!python/module:os",
        '!custom "touch {pwned}"',
    ],
)
def test_yaml_tags_are_refused_and_never_run(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    pwned = tmp_path / "pwned"
    study = tmp_path / "tagged.yaml"
    study.write_text(f"name: tagged\ndescription: {value.format(pwned=pwned)}\n")
    for command in ("validate", "run"):
        result = CliRunner().invoke(app, [command, str(study)])
        assert result.exit_code == 2, result.output
        assert f"error {study}:2:" in result.output and "is not allowed" in result.output
        assert "Traceback" not in result.output
    assert not pwned.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tagged.yaml"]


def test_the_plain_string_tag_is_plain_data(tmp_path: Path) -> None:
    study = tmp_path / "str.yaml"
    study.write_text("name: !!str 2024\n")
    spec, _ = load_study(study)
    assert spec.name == "2024"


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    """Nine aliases of nine aliases, nine levels deep: 387 million strings if expanded."""
    lines = ["name: bomb", 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for previous, level in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{level}: &{level} [{', '.join([f'*{previous}'] * 9)}]")
    study = tmp_path / "bomb.yaml"
    study.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    result = CliRunner().invoke(app, ["validate", str(study)])
    assert time.monotonic() - started < 30  # expanding it would take hours and all the memory
    assert result.exit_code == 2, result.output
    assert f"more than {MAX_VALUES:,} values once its aliases are expanded" in result.output


def test_aliases_within_the_limit_still_work(tmp_path: Path) -> None:
    study = tmp_path / "aliases.yaml"
    study.write_text(
        "name: aliases\nbase:\n  model: &vit {backbone: vit_mini, placement: last2}\ncases:\n  - *vit\n"
        "  - {<<: *vit, placement: every2}\n"
    )
    spec, source = load_study(study)
    assert len(expand(spec, source)) == 2


def test_a_document_nested_too_deeply_is_refused_without_a_traceback(tmp_path: Path) -> None:
    study = tmp_path / "deep.yaml"
    study.write_text("name: deep\nbase: " + "[" * 1000 + "]" * 1000 + "\n")
    result = CliRunner().invoke(app, ["validate", str(study)])
    assert result.exit_code == 2, result.output
    assert "nested too deeply" in result.output and "Traceback" not in result.output


# ---- Paths: what the platform writes stays under the folders it names ------------------------------------


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "a\\\\b", "~root", "x" * 101])
def test_a_study_name_that_is_not_a_plain_folder_name_is_refused(name: str, tmp_path: Path) -> None:
    study = tmp_path / "named.yaml"
    study.write_text(f'name: "{name}"\n')
    result = CliRunner().invoke(app, ["validate", str(study)])
    assert result.exit_code == 2, result.output
    assert f"error {study}:1:7: name: " in result.output


def test_trials_are_stored_by_hash_whatever_their_names_say(tmp_path: Path) -> None:
    """A value of the study can put ``../`` into a trial's name; Ray Tune's trial folder and Ray Train's
    run folder (its checkpoints) are named by the trial hash."""
    study = tmp_path / "paths.yaml"
    study.write_text(
        "name: paths\nbase: {data: {dataset: folder, root: /data/imagenet, num_classes: 10}}\n"
        "grid:\n  root: ['../../../evil', /data/imagenet]\n"
    )
    spec, source = load_study(study)
    trials = expand(spec, source)
    assert any("../../../evil" in trial.name for trial in trials)
    for trial in trials:
        folder = f"trial-{trial.hash[:16]}"
        assert train_run_name(trial.hash) == folder
        assert _tune_trial_dir(SimpleNamespace(config={"sweetspot": _payload(trial, None)})) == folder


def test_figures_land_in_their_folder_whatever_the_labels_and_layer_names_say(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "figures"
    analysis = synthetic_analysis(tmp_path / "routing.npz", layers=1)
    evil = replace(analysis, layers=(replace(analysis.layers[0], name="../../../evil"),))
    paths = spatial_map_figures(evil, out)
    assert paths and all(path.resolve().is_relative_to(out.resolve()) for path in paths)
    # write_study_figures: a routing label becomes a folder under out/routing.
    routing = {"../../../evil": tmp_path / "routing.npz"}
    paths = write_study_figures(frame([trial_row("ViT-S", 0, 80.0, 20.0, placement="none")]), routing, out)
    assert paths and all(path.resolve().is_relative_to(out.resolve()) for path in paths)
    outside = [
        p for p in tmp_path.rglob("*") if p.is_file() and not p.resolve().is_relative_to(out.resolve())
    ]
    assert [p.name for p in outside] == ["routing.npz"]
