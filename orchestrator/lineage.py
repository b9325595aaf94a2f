"""Where fine-tuning and linear-probe trials start: ``recipe.init_from`` → a checkpoint.

``init_from`` names either a checkpoint (a folder holding ``state.pt``, or the file) or
another study's YAML. For a study, each trial starts from that study's trial with the same
model (backbone, placement, MoE layer, patch size; stochastic depth may differ, as it does
between the paper's ImageNet-21k and -1k recipes) and the same seed, which must have
FINISHED. Paths are relative to the current directory, like every path in a study.

Resolution happens in the driver before any trial starts, so a missing pretraining run is
a clear error up front rather than a failed trial an hour later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.expand import Trial, expand
from orchestrator.redact import redact
from orchestrator.spec import StudyError, StudySpec, load_study
from trainer.config import TrialConfig
from trainer.loop import CHECKPOINT_FILE

_STUDY_SUFFIXES = (".yaml", ".yml")


class LineageError(ValueError):
    """``init_from`` cannot be resolved to a checkpoint."""


@dataclass(frozen=True)
class InitSource:
    """The checkpoint a trial starts from, and the trial that wrote it (when known)."""

    checkpoint: Path
    study: str | None = None
    trial_hash: str | None = None


def model_key(config: TrialConfig) -> dict[str, Any]:
    """What must match between a pretraining trial and the trial it initialises."""
    model = config.model.model_dump(mode="json")
    model.pop("drop_path")
    model["moe"] = None if config.model.is_dense else config.model.moe.identity()
    return {"model": model, "seed": config.seed}


def resolve_inits(trials: list[Trial]) -> dict[str, InitSource]:
    """Trial hash → its start checkpoint, for every trial with ``recipe.init_from``.

    Raises:
        LineageError: a checkpoint is missing, or a referenced study has no finished trial
            with the same model and seed (or several).
    """
    studies: dict[str, tuple[StudySpec, list[Trial], Any]] = {}
    resolved: dict[str, InitSource] = {}
    for trial in trials:
        init_from = trial.config.recipe.init_from
        if init_from is None:
            continue
        path = Path(init_from).expanduser()
        if path.suffix not in _STUDY_SUFFIXES:
            checkpoint = path / CHECKPOINT_FILE if path.is_dir() else path
            if not checkpoint.is_file():
                raise LineageError(f"init_from {init_from!r}: no checkpoint at {checkpoint}")
            resolved[trial.hash] = InitSource(checkpoint)
            continue
        if init_from not in studies:
            studies[init_from] = _load_source_study(path)
        spec, source_trials, store = studies[init_from]
        key = model_key(trial.config)
        matches = [t for t in source_trials if model_key(t.config) == key]
        where = f"init_from {init_from!r} (study {spec.name})"
        if not matches:
            raise LineageError(
                f"{where} has no trial with the model of {trial.name} and seed {trial.seed}; "
                "the pretraining study must have the same backbones, placements, MoE layers and seeds"
            )
        if len(matches) > 1:
            names = ", ".join(f"{t.name} [{t.short_hash}]" for t in matches)
            raise LineageError(
                f"{where} has {len(matches)} trials that could initialise {trial.name}: {names}"
            )
        source = matches[0]
        runs = store.trial_runs() if store is not None else {}
        status = runs[source.hash].status if source.hash in runs else "not run"
        if status != "FINISHED":
            raise LineageError(
                f"{where}: {source.name} seed {source.seed} is {status}; run `sweetspot run {init_from}` first"
            )
        if spec.remote_storage:
            raise LineageError(
                f"{where}: its checkpoints are in {redact(spec.ray_storage)}; starting from a checkpoint in an "
                "object store is not supported: give init_from the checkpoint folder, downloaded or on a "
                "shared filesystem"
            )
        checkpoint = latest_checkpoint(Path(spec.train_storage) / train_run_name(source.hash))
        if checkpoint is None:
            raise LineageError(f"{where}: {source.name} seed {source.seed} FINISHED but left no checkpoint")
        resolved[trial.hash] = InitSource(checkpoint, spec.name, source.hash)
    return resolved


def train_run_name(trial_hash: str) -> str:
    """The Ray Train run of a trial: named by hash, so a relaunch finds its checkpoints."""
    return f"trial-{trial_hash[:16]}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``state.pt`` a Ray Train run left (its checkpoint folders sort by time)."""
    if not run_dir.is_dir():
        return None
    found = sorted(
        run_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}"), key=lambda p: (p.stat().st_mtime, p.parent.name)
    )
    return found[-1] if found else None


def _load_source_study(path: Path) -> tuple[StudySpec, list[Trial], Any]:
    from orchestrator.tracking import StudyStore

    try:
        spec, source = load_study(path)
        source_trials = expand(spec, source)
    except StudyError as error:
        raise LineageError(f"init_from {str(path)!r} is not a valid study:\n{error}") from None
    uri = spec.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return spec, source_trials, None  # never run: don't create an empty store for it
    try:
        store = StudyStore.open(spec, create=False)
    except LookupError:
        store = None
    return spec, source_trials, store
