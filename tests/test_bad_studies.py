"""Every broken study file is refused with file:line, the field and a one-line reason: exit 2, no traceback.

Each file in tests/bad_studies/ starts with ``# expect: LINE | FIELD | REASON FRAGMENT``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app

BAD = sorted((Path(__file__).parent / "bad_studies").glob("*.yaml"))


def expectation(path: Path) -> tuple[int, str, str]:
    header = path.read_text().splitlines()[0]
    assert header.startswith("# expect:"), f"{path.name} has no '# expect:' header"
    line, field, reason = (part.strip() for part in header.removeprefix("# expect:").split("|"))
    return int(line), field, reason


def test_there_are_enough_bad_studies() -> None:
    assert len(BAD) >= 20


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_validate_rejects_bad_study_with_location(path: Path) -> None:
    line, field, reason = expectation(path)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    where = f"{path}:{line}:"
    matching = [out for out in result.output.splitlines() if where in out]
    assert matching, f"no problem reported at {where}:\n{result.output}"
    problem = matching[0]
    if field:
        assert f": {field}: " in problem, problem
    assert reason in problem, problem


def test_real_cli_process_exits_2_without_traceback() -> None:
    path = next(p for p in BAD if p.stem == "top_k_exceeds_experts")
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "validate", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    assert f"{path}:5:" in done.stderr


def test_missing_study_file_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "cannot read the study file" in result.output
