"""The study file's schema (Pydantic, strict) and its axes.

A study is a ``base`` :class:`~trainer.config.TrialConfig`, a ``grid`` of axes to
cross, optional ``cases`` (each crossed with the grid), ``exclude`` rules, seeds,
and how to run and track it. An axis is any field of the trial config, named by
its dotted path (``model.moe.experts``) or, when unambiguous, by its last part
(``experts``).
"""

from __future__ import annotations

import difflib
import math
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.source import PathKey, Problem, Source, StudyError, load
from trainer.config import TrialConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ResourcesSpec(_Strict):
    """How each trial runs on the Ray cluster.

    Attributes:
        workers: Ray Train workers (DDP ranks) per trial.
        cpus_per_worker: logical CPUs reserved per worker (fractions allowed).
        gpus_per_worker: GPUs per worker; 0 trains on CPU with gloo.
        max_concurrent_trials: trials running at once; default: as many as the cluster fits.
    """

    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1)

    @field_validator("cpus_per_worker", "gpus_per_worker", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class TrackingSpec(_Strict):
    """Where results go.

    Attributes:
        uri: MLflow tracking URI; default ``sqlite:///<output>/mlflow.db``.
        experiment: MLflow experiment name; default: the study name.
    """

    uri: str | None = None
    experiment: str | None = None


class TableSpec(_Strict):
    """What ``sweetspot table`` shows besides the trial name and parameter counts.

    Attributes:
        metrics: final-epoch metrics, one column each.
    """

    metrics: list[str] = Field(default_factory=lambda: ["val_top1"], min_length=1)


class SchedulerSpec(_Strict):
    """Early stopping by comparing trials: a trial that falls behind the others is stopped.

    ``asha`` is Ray Tune's ASHA (``ASHAScheduler``, asynchronous successive halving) with the
    epoch as its clock: at ``grace_period``, ``grace_period × reduction_factor``,
    ``grace_period × reduction_factor²``, … epochs, a trial continues only if its ``metric`` is
    among the best ``1 / reduction_factor`` of the trials that reached that epoch so far. The
    last epoch is that of the longest trial of the study.

    Attributes:
        kind: the scheduler; ``asha`` is the only one.
        metric: the metric compared, one the trials report every epoch (``val_top1``,
            ``val_loss``, …). At an epoch that does not report it, no trial is stopped.
        mode: ``max`` (higher is better, e.g. ``val_top1``) or ``min`` (e.g. ``val_loss``).
        grace_period: epochs every trial trains before it can be stopped (>= 1).
        reduction_factor: how selective each rung is (>= 2): 1 in ``reduction_factor`` trials
            continues past it.
    """

    kind: Literal["asha"] = "asha"
    metric: str = Field(min_length=1)
    mode: Literal["max", "min"]
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(4, ge=2)


class StopSpec(_Strict):
    """A rule that stops every trial once its metric reaches a threshold.

    Attributes:
        metric: the metric tested after every epoch (any metric the trials report).
        mode: ``max``: stop once ``metric >= threshold``; ``min``: once ``metric <= threshold``.
        threshold: the value that is good enough.
    """

    metric: str = Field(min_length=1)
    mode: Literal["max", "min"]
    threshold: float

    @field_validator("threshold", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def met(self, result: dict[str, Any]) -> bool:
        """Whether ``result`` (one epoch's metrics) reaches the threshold; False when it lacks the metric."""
        value = result.get(self.metric)
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
            return False
        return value >= self.threshold if self.mode == "max" else value <= self.threshold

    def describe(self) -> str:
        """``val_top1 >= 99``."""
        return f"{self.metric} {'>=' if self.mode == 'max' else '<='} {self.threshold:g}"


class StudySpec(_Strict):
    """One study file.

    Attributes:
        name: identifies the study (MLflow experiment, Ray Tune experiment, output folder).
        description: free text, shown in reports.
        base: the trial config every trial starts from.
        grid: axis → values; trials are the cartesian product.
        cases: explicit override sets, each crossed with the grid (default: one empty case).
        exclude: drop trials whose axes match every entry of a rule (a value or a list of values).
        seeds: one trial per configuration and seed.
        max_failures: restarts a trial gets after a failure (a worker process or node lost, an
            error), each resuming from its last checkpoint; then it is FAILED.
        resources: workers and devices per trial, concurrency.
        scheduler: optional early stopping of trials that fall behind the others (ASHA); default
            none: every trial runs all its epochs.
        stop: optional rule that stops any trial once a metric reaches a threshold.
        tracking: MLflow location.
        output: folder for the tracking store, Ray results and checkpoints; default ``runs/<name>``.
        table: the result table's columns.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    description: str = ""
    base: TrialConfig = TrialConfig()
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    cases: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    max_failures: int = Field(1, ge=0)
    resources: ResourcesSpec = ResourcesSpec()
    scheduler: SchedulerSpec | None = None
    stop: StopSpec | None = None
    tracking: TrackingSpec = TrackingSpec()
    output: str | None = None
    table: TableSpec = TableSpec()

    @property
    def output_dir(self) -> Path:
        return Path(self.output if self.output is not None else f"runs/{self.name}").resolve()

    @property
    def train_storage(self) -> Path:
        """Ray Train's storage: one run folder per trial, holding its checkpoints."""
        return self.output_dir / "ray" / "train"

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.output_dir / 'mlflow.db'}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name


# ---------------------------------------------------------------------------------------------
# Axes


@cache
def axis_paths() -> dict[str, tuple[str, ...]]:
    """Every field of the trial config, leaves and sub-models, by dotted path."""
    paths: dict[str, tuple[str, ...]] = {}

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, field in model.model_fields.items():
            path = (*prefix, name)
            paths[".".join(path)] = path
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, path)

    walk(TrialConfig, ())
    return paths


@cache
def _short_names() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for dotted_path, path in axis_paths().items():
        names.setdefault(path[-1], []).append(dotted_path)
    return names


def resolve_axis(name: str) -> tuple[str, ...]:
    """``experts`` → ``("model", "moe", "experts")``; a clear ValueError for unknown or ambiguous names."""
    if name == "seed":
        raise ValueError("seeds are not a grid axis; list them under 'seeds:'")
    if name in axis_paths():
        return axis_paths()[name]
    candidates = _short_names().get(name, [])
    if len(candidates) == 1:
        return axis_paths()[candidates[0]]
    if candidates:
        raise ValueError(f"axis {name!r} is ambiguous; use one of: {', '.join(sorted(candidates))}")
    known = [n for n, c in _short_names().items() if len(c) == 1] + list(axis_paths())
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown axis {name!r}{hint}")


def axis_label(path: tuple[str, ...]) -> str:
    """The shortest unambiguous name of an axis, for tables and trial names."""
    return path[-1] if len(_short_names()[path[-1]]) == 1 else ".".join(path)


# ---------------------------------------------------------------------------------------------
# Loading


def load_study(path: Path) -> tuple[StudySpec, Source]:
    """Load and validate a study file's structure; every problem is located in the file.

    Raises:
        StudyError: with one :class:`Problem` per error (file, line, field, reason).
    """
    source = load(path)
    try:
        spec = StudySpec.model_validate(source.data)
    except ValidationError as error:
        raise StudyError([problem_from_error(source, err, ()) for err in error.errors()]) from None
    problems = _check_axes(spec, source)
    if problems:
        raise StudyError(problems)
    return spec, source


def problem_from_error(source: Source, err: Any, prefix: tuple[PathKey, ...]) -> Problem:
    """A Pydantic error (one entry of ``errors()``) as a located, one-line Problem."""
    loc = (*prefix, *err["loc"])
    kind, message = err["type"], err["msg"]
    if kind == "extra_forbidden":
        message = f"unknown field {loc[-1]!r}" + _did_you_mean(source, loc)
    elif kind == "missing":
        message = "required field is missing"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    elif "input_value" not in message and "input" in err and not isinstance(err["input"], dict | list):
        message = f"{message} (got {err['input']!r})"
    return source.problem(loc, message)


def _did_you_mean(source: Source, loc: tuple[PathKey, ...]) -> str:
    model: Any = StudySpec
    for key in loc[:-1]:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        annotation = _optional_model(field.annotation) if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _optional_model(annotation: Any) -> Any:
    """``SchedulerSpec | None`` → ``SchedulerSpec``; any other annotation unchanged."""
    if get_origin(annotation) in (Union, UnionType):
        models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    return annotation


def _check_axes(spec: StudySpec, source: Source) -> list[Problem]:
    problems: list[Problem] = []
    resolved: dict[tuple[str, ...], str] = {}
    for axis, values in spec.grid.items():
        try:
            path = resolve_axis(axis)
        except ValueError as error:
            problems.append(source.problem(("grid", axis), str(error)))
            continue
        if path in resolved:
            problems.append(source.problem(("grid", axis), f"same axis as {resolved[path]!r}"))
        resolved[path] = axis
        if not values:
            problems.append(source.problem(("grid", axis), "an axis needs at least one value"))
        seen: list[Any] = []
        for index, value in enumerate(values):
            if value in seen:
                problems.append(source.problem(("grid", axis, index), f"duplicate value {value!r}"))
            seen.append(value)
    for section in ("cases", "exclude"):
        for index, entry in enumerate(getattr(spec, section)):
            if not entry and section == "exclude":
                problems.append(source.problem((section, index), "an exclude rule needs at least one axis"))
            for axis in entry:
                try:
                    resolve_axis(axis)
                except ValueError as error:
                    problems.append(source.problem((section, index, axis), str(error)))
    if len(set(spec.seeds)) != len(spec.seeds):
        problems.append(source.problem(("seeds",), f"duplicate seeds in {spec.seeds}"))
    return problems
