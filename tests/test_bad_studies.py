"""Every broken study is refused with file:line, the field and a one-line reason: exit 2, no traceback,
nothing started.

Each file in tests/bad_studies/ starts with ``# expect: LINE | FIELD | REASON FRAGMENT`` and is broken
on every machine: ``validate`` and ``run`` both refuse it. ``bad_studies/without_tutel/`` holds a study
that is only broken where tutel is not installed; the refusals that need a cluster (resources) or
a count (over 10 000 trials) are built by their tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from orchestrator.cli import MAX_TRIALS_WITHOUT_YES, app
from orchestrator.spec import load_study
from orchestrator.tracking import StudyStore
from trainer.moe import tutel_backend

HERE = Path(__file__).parent / "bad_studies"
BAD = sorted(HERE.glob("*.yaml"))  # broken everywhere
TUTEL_STUDY = HERE / "without_tutel" / "tutel_backend.yaml"
# Runs sweetspot in a Python where `import tutel` fails, as on a machine without it: the real check,
# nothing of ours replaced (importlib finds no module that sys.modules maps to None).
WITHOUT_TUTEL = "import sys; sys.modules['tutel'] = None; from orchestrator.cli import app; app()"


def expectation(path: Path) -> tuple[int, str, str]:
    header = path.read_text().splitlines()[0]
    assert header.startswith("# expect:"), f"{path.name} has no '# expect:' header"
    line, field, reason = (part.strip() for part in header.removeprefix("# expect:").split("|"))
    return int(line), field, reason


def assert_refused_at_its_line(output: str, path: Path) -> None:
    """One ``error FILE:LINE:COL: FIELD: REASON`` line per problem, the expected one among them, then
    ``FILE: N problem(s); nothing was run.``; no traceback."""
    line, field, reason = expectation(path)
    assert "Traceback" not in output, output
    *problems, summary = output.strip().splitlines()
    assert re.fullmatch(rf"{re.escape(str(path))}: {len(problems)} problems?; nothing was run\.", summary), (
        output
    )
    assert problems and all(re.match(rf"error {re.escape(str(path))}:\d+:\d+: ", p) for p in problems), output
    at_line = [p for p in problems if p.startswith(f"error {path}:{line}:")]
    assert at_line, f"no problem reported at {path}:{line}:\n{output}"
    assert any((not field or f": {field}: " in p) and reason in p for p in at_line), at_line


def test_there_are_enough_bad_studies() -> None:
    assert len(BAD) >= 60


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_validate_rejects_bad_study_with_location(path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert_refused_at_its_line(result.output, path)


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_run_refuses_bad_study_before_anything_starts(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the study's output folder (runs/<name>), its mlflow.db, Ray's results
    ray_was_up = ray.is_initialized()
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert_refused_at_its_line(result.output, path)
    assert list(tmp_path.iterdir()) == []  # no output folder, no MLflow store
    assert ray.is_initialized() == ray_was_up  # no Ray started


def test_real_cli_process_exits_2_without_traceback() -> None:
    path = next(p for p in BAD if p.stem == "top_k_exceeds_experts")
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    assert f"{path}:5:" in done.stderr


def test_missing_study_file_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "cannot read the study file" in result.output


# ---- Tutel, where it is not installed ------------------------------------------------------------------------


def sweetspot_without_tutel(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TUTEL, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_tutel_backend_is_refused_where_tutel_is_absent(tmp_path: Path) -> None:
    for command in ("validate", "run"):
        done = sweetspot_without_tutel(command, str(TUTEL_STUDY), cwd=tmp_path)
        assert done.returncode == 2, done.stdout + done.stderr
        assert_refused_at_its_line(done.stdout + done.stderr, TUTEL_STUDY)
    assert list(tmp_path.iterdir()) == []  # run created nothing
    # backend auto is the way to use tutel where it is installed: here it falls back to native.
    auto = tmp_path / "auto.yaml"
    auto.write_text(TUTEL_STUDY.read_text().replace("backend: tutel", "backend: auto"))
    done = sweetspot_without_tutel("validate", str(auto), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(not tutel_backend.available(), reason="tutel is not installed (it is not on PyPI)")
def test_tutel_backend_is_accepted_where_tutel_is_installed() -> None:
    result = CliRunner().invoke(app, ["validate", str(TUTEL_STUDY)])
    assert result.exit_code == 0, result.output


# ---- Refusals that depend on the cluster or on the trial count -----------------------------------------------


def test_run_refuses_resources_that_can_never_fit_and_starts_no_trial(
    local_ray: None, tmp_path: Path
) -> None:
    study = tmp_path / "too_big.yaml"
    study.write_text(
        f"name: too_big\nresources:\n  workers: 4\n  cpus_per_worker: 1\noutput: {tmp_path / 'out'}\n"
    )
    result = CliRunner().invoke(app, ["run", str(study)])  # the session's Ray has 2 CPUs
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error ")]
    assert errors == [
        (
            f"error {study}:2:1: resources: a trial needs 4.01 CPUs and 0 GPUs (4 workers × 1 CPU, 0 GPU, plus "
            "0.01 for the trial driver) but the Ray cluster has 2 CPUs and 0 GPUs; lower resources.workers or "
            "resources.cpus_per_worker/gpus_per_worker"
        )
    ]
    spec, _ = load_study(study)
    assert StudyStore.open(spec, create=False).trial_runs() == {}  # no trial was started
    assert not (tmp_path / "out" / "ray").exists()  # nor any Tune experiment


def big_study(tmp_path: Path, base: str = "{}") -> Path:
    """A study of one more trial than ``run`` takes without --yes (one model: cheap to plan)."""
    study = tmp_path / "big.yaml"
    warmups = list(range(MAX_TRIALS_WITHOUT_YES + 1))
    study.write_text(f"name: big\nbase: {base}\ngrid:\n  warmup_epochs: {warmups}\n")
    return study


def test_run_asks_for_yes_above_10000_trials_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = "{data: {dataset: folder, root: /nonexistent/sweetspot/data, num_classes: 10}}"
    study = big_study(tmp_path, base=data)
    result = CliRunner().invoke(app, ["run", str(study)])
    assert result.exit_code == 2, result.output
    assert f"error {study}:3:1: grid: the study expands to 10,001 trials, more than 10,000;" in result.output
    assert "pass --yes to run them all" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.yaml"]  # no output folder, no MLflow store
    # --yes lets it through to the next check, which refuses the missing data: nothing starts either.
    result = CliRunner().invoke(app, ["run", "--yes", str(study)])
    assert result.exit_code == 2, result.output
    assert "10,001 trials" not in result.output
    assert f"error {study}:2:" in result.output and "is not a folder" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.yaml"]


def test_plan_lists_a_study_of_more_than_10000_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["plan", "--format", "csv", str(big_study(tmp_path))])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1 + MAX_TRIALS_WITHOUT_YES + 1  # the header and every trial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.yaml"]  # planning creates no store


@pytest.mark.parametrize(
    "study",
    [
        # A top_k in base is the default of the token-choice cases; the Soft MoE case ignores it.
        "name: ok\nbase: {model: {moe: {top_k: 1}}}\ncases:\n  - {router: soft}\n  - {router: linear, top_k: 2}\n",
        # A grid over routers × top_k: the Soft MoE trials collapse to one configuration.
        "name: ok\ngrid:\n  router: [linear, soft]\n  top_k: [1, 2]\n",
    ],
)
def test_a_top_k_that_other_routers_use_is_fine_next_to_soft_moe(study: str, tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(study)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
