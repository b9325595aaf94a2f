"""Resuming from the newest checkpoint that loads, without Ray: real ``torch.save`` files, one of
them truncated as a crash or a full disk leaves it; the standalone trainer; two gloo ranks."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from two_ranks import run_on_two_ranks

from trainer.checkpoint import (
    CHECKPOINT_FILE,
    FALLBACK_KEY,
    CheckpointError,
    LocalCandidate,
    load_newest,
    load_state,
)
from trainer.config import TrialConfig
from trainer.loop import TIMELINE_ENV, train
from trainer.report import RAY_SNAPSHOT_FILE, LocalReporter, RayTrainReporter

TINY = {
    "model": {"backbone": "vit_mini", "placement": "last2", "moe": {"experts": 4, "top_k": 2}},
    "data": {"train_samples": 256},
    "recipe": {"epochs": 2, "batch_size": 64, "lr": 0.003},
}


def _state(epoch: int) -> dict:
    """A training state as ``_checkpoint_state`` writes one, big enough that truncation bites."""
    return {
        "epoch": epoch,
        "metrics": {"epoch": epoch + 1},
        "resumes": 0,
        "model": {"weight": torch.randn(256, 256)},
        "optimizer": {},
        "scheduler": {},
        "rng": {"torch": torch.get_rng_state()},
    }


def _save(folder: Path, epoch: int) -> LocalCandidate:
    folder.mkdir(parents=True)
    torch.save(_state(epoch), folder / CHECKPOINT_FILE)
    return LocalCandidate(folder.name, folder)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    previous = _save(tmp_path / "checkpoint_1", epoch=0)
    latest = _save(tmp_path / "checkpoint_2", epoch=1)
    _truncate(latest.folder / CHECKPOINT_FILE)

    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        resumed = load_newest([latest, previous])

    assert resumed.state is not None and resumed.state["epoch"] == 0
    assert resumed.name == "checkpoint_1"
    ((name, reason),) = resumed.skipped
    assert name == "checkpoint_2" and "cannot be read" in reason
    # The warning names the bad checkpoint and why; the record says where the trial resumed from.
    warning = next(r.getMessage() for r in caplog.records if "does not load" in r.getMessage())
    assert "checkpoint_2" in warning and "cannot be read" in warning
    assert resumed.fallback is not None
    assert resumed.fallback.startswith("resumed from checkpoint_1 (epoch 1) because 1 newer checkpoint(s)")


def test_the_latest_checkpoint_is_used_when_it_loads(tmp_path: Path) -> None:
    previous = _save(tmp_path / "checkpoint_1", epoch=0)
    latest = _save(tmp_path / "checkpoint_2", epoch=1)
    resumed = load_newest([latest, previous])
    assert resumed.state is not None and resumed.state["epoch"] == 1
    assert resumed.skipped == () and resumed.fallback is None


def test_a_checkpoint_folder_without_its_file_is_skipped(tmp_path: Path) -> None:
    previous = _save(tmp_path / "checkpoint_1", epoch=0)
    empty = tmp_path / "checkpoint_2"
    empty.mkdir()  # an upload that failed before the file was created
    resumed = load_newest([LocalCandidate("checkpoint_2", empty), previous])
    assert resumed.state is not None and resumed.state["epoch"] == 0
    assert resumed.skipped == (("checkpoint_2", f"{CHECKPOINT_FILE} is missing"),)


def test_an_empty_file_and_a_state_without_its_parts_do_not_load(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / CHECKPOINT_FILE).write_bytes(b"")  # what a full disk leaves
    with pytest.raises(CheckpointError, match=r"\(0 bytes\) cannot be read"):
        load_state(tmp_path / "empty")
    (tmp_path / "partial").mkdir()
    torch.save({"epoch": 3}, tmp_path / "partial" / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="has no model, optimizer, scheduler, rng"):
        load_state(tmp_path / "partial")


def test_when_no_checkpoint_loads_the_trial_fails_naming_each_and_why(tmp_path: Path) -> None:
    previous = _save(tmp_path / "checkpoint_1", epoch=0)
    latest = _save(tmp_path / "checkpoint_2", epoch=1)
    _truncate(previous.folder / CHECKPOINT_FILE)
    _truncate(latest.folder / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError) as raised:
        load_newest([latest, previous])
    message = str(raised.value)
    assert "\n" not in message  # `sweetspot run` prints a failure's last line
    assert message.startswith("none of the trial's 2 checkpoint(s) loads")
    assert "checkpoint_2: state.pt" in message and "checkpoint_1: state.pt" in message
    assert "delete the folder that holds them" in message


def test_no_checkpoint_at_all_is_a_fresh_start(tmp_path: Path) -> None:
    resumed = load_newest([])
    assert resumed.state is None and resumed.skipped == ()


def test_a_checkpoint_one_rank_cannot_load_is_skipped_by_every_rank(tmp_path: Path) -> None:
    previous = _save(tmp_path / "checkpoint_1", epoch=0)
    latest = _save(tmp_path / "checkpoint_2", epoch=1)
    votes: list[bool] = []

    def all_ranks(ok: bool) -> bool:  # another rank failed on the first candidate
        votes.append(ok)
        return ok and len(votes) > 1

    resumed = load_newest([latest, previous], all_ranks)
    assert votes == [True, True]
    assert resumed.state is not None and resumed.state["epoch"] == 0
    assert resumed.skipped == (("checkpoint_2", "another rank could not load it"),)


# --- Ray Train's checkpoint folders (no Ray run: its latest checkpoint is given) -------------


def _ray_run(
    tmp_path: Path, folders: list[str], snapshot: str, latest: str, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A Ray Train run folder with these checkpoint folders and snapshot file, ``latest`` Ray's latest."""
    import ray.train

    run = tmp_path / "trial-0123456789abcdef"
    for folder in folders:
        (run / folder).mkdir(parents=True)
    (run / RAY_SNAPSHOT_FILE).write_text(snapshot)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(run / latest)))
    return run


def test_ray_candidates_follow_rays_order_and_a_failed_upload_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ray registered _3 then _2 (rank 0 moved to a node whose clock is behind); _4 is an upload
    # that failed after _2, _1 one that Ray evicted long ago but could not delete.
    registered = {
        "checkpoint_results": [{"checkpoint_dir_name": n} for n in ("checkpoint_3", "checkpoint_2")]
    }
    names = ["checkpoint_1", "checkpoint_2", "checkpoint_3", "checkpoint_4"]
    run = _ray_run(tmp_path, names, json.dumps(registered), "checkpoint_2", monkeypatch)

    candidates = RayTrainReporter().checkpoints()

    assert [c.name for c in candidates] == [str(run / "checkpoint_2"), str(run / "checkpoint_3")]
    assert sorted(p.name for p in run.glob("checkpoint_?")) == names[:3]  # only _4 is deleted
    with candidates[1].open() as folder:
        assert folder == run / "checkpoint_3"


def test_ray_candidates_sort_by_name_when_rays_list_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["checkpoint_1", "checkpoint_2", "checkpoint_3"]
    run = _ray_run(tmp_path, names, "{truncated", "checkpoint_2", monkeypatch)
    candidates = RayTrainReporter().checkpoints()
    assert [c.name for c in candidates] == [str(run / "checkpoint_2"), str(run / "checkpoint_1")]
    assert sorted(p.name for p in run.glob("checkpoint_?")) == names  # nothing deleted on a guess


# --- the trainer, standalone (LocalReporter keeps checkpoint/ and checkpoint.prev/) -----------


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A standalone run of TINY's 2 epochs: its output folder, with both checkpoints."""
    out = tmp_path_factory.mktemp("two_epochs")
    train(TrialConfig.model_validate(TINY), LocalReporter(out))
    return out


def test_a_standalone_run_keeps_the_previous_checkpoint_beside_the_latest(two_epochs: Path) -> None:
    assert load_state(two_epochs / "checkpoint")["epoch"] == 1
    assert load_state(two_epochs / "checkpoint.prev")["epoch"] == 0
    assert not (two_epochs / "checkpoint.tmp").exists()


def test_a_standalone_run_resumes_from_the_previous_checkpoint_when_the_latest_is_truncated(
    two_epochs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    shutil.copytree(two_epochs, out)
    _truncate(out / "checkpoint" / CHECKPOINT_FILE)
    timeline = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(TIMELINE_ENV, str(timeline))

    resumed = LocalReporter(out)
    train(TrialConfig.model_validate(TINY), resumed)

    events = [json.loads(line) for line in timeline.read_text().splitlines()]
    # Epoch 2 again, its checkpoint being the truncated one: not nothing (the truncated
    # checkpoint said "done"), not from scratch.
    assert [e["epoch"] for e in events if e["event"] == "epoch_end"] == [2]
    assert [m["epoch"] for m in resumed.history] == [1, 2]  # each epoch recorded once
    # The re-trained epoch's checkpoint is the latest; it knows it resumed once.
    assert load_state(out / "checkpoint")["epoch"] == 1
    assert load_state(out / "checkpoint")["resumes"] == 1


# --- two gloo ranks agree on one checkpoint --------------------------------------------------


@dataclass(frozen=True)
class _UnreadableOnRank1:
    """A checkpoint rank 1 cannot get (say, its node does not see the file yet)."""

    name: str
    folder: Path

    @contextmanager
    def open(self) -> Iterator[Path]:
        if dist.get_rank() == 1:
            raise OSError(f"{self.folder} is not visible from this node")
        yield self.folder


@dataclass(frozen=True)
class _Listed:
    """A reporter that only lists checkpoints; only rank 0 may be asked."""

    candidates: list

    def checkpoints(self) -> list:
        assert dist.get_rank() == 0, "only rank 0 lists the checkpoints"
        return self.candidates


def _restore_on_both_ranks(rank: int, out: Path, results: Path) -> None:
    from trainer import recipe as recipes
    from trainer.data import input_spec
    from trainer.loop import _expert_parameters, _restore
    from trainer.models import build_model

    trial = TrialConfig.model_validate(TINY)
    model = build_model(trial.model, input_spec(trial.data), device=torch.device("cpu"))
    optimizer = recipes.build_optimizer(model, trial.recipe, _expert_parameters(model))
    scheduler = recipes.build_scheduler(optimizer, trial.recipe, 4)
    reporter = _Listed(
        [
            _UnreadableOnRank1("latest", out / "checkpoint"),
            LocalCandidate("previous", out / "checkpoint.prev"),
        ]
        if rank == 0
        else []
    )
    start_epoch, metrics, resumes = _restore(reporter, model, optimizer, scheduler, None)  # type: ignore[arg-type]
    (results / f"rank{rank}.json").write_text(
        json.dumps(
            {"start_epoch": start_epoch, "resumes": resumes, "fallback": (metrics or {}).get(FALLBACK_KEY)}
        )
    )


def test_every_rank_resumes_from_the_same_checkpoint_when_one_rank_cannot_load_the_latest(
    two_epochs: Path, tmp_path: Path
) -> None:
    run_on_two_ranks(_restore_on_both_ranks, two_epochs, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["start_epoch"] == ranks[1]["start_epoch"] == 1  # from checkpoint.prev, epoch 1
    assert ranks[0]["resumes"] == ranks[1]["resumes"] == 1
    assert ranks[0]["fallback"].startswith("resumed from previous (epoch 1)")
    assert "latest: another rank could not load it" in ranks[0]["fallback"]
