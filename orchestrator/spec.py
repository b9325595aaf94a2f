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
import re
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
        placement_strategy: how a trial's workers are placed on the cluster's nodes (Ray's
            placement group strategies): ``PACK`` (as few nodes as possible, the default),
            ``SPREAD`` (as many as possible), ``STRICT_PACK`` (all on one node: NVLink between the
            ranks, the fastest all-to-all), ``STRICT_SPREAD`` (each worker on its own node).
    """

    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

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


# Columns a result table can show besides metrics and axes; orchestrator.results makes them.
CONFIG_COLUMNS = ("name", "params_total_m", "params_active_m", "gflops", "n", "seeds", "status", "epoch")
# Metrics the trainer logs once, after training, without being asked (trainer.loop._final_metrics):
# results collects them whenever a run has them, so a table may show them without listing them.
FINAL_METRICS = re.compile(r"inference_images_per_s|ood_[a-z0-9_]+_(top1|top5|loss)")


class PivotSpec(_Strict):
    """One metric laid out as a grid over two axes (the paper's Figure 3 and Table 4 layouts).

    Configurations without a value on one of the two axes (the MoE axes of a dense baseline) get
    a row of their own, labelled by name, their value in every column.

    Attributes:
        rows: the axis whose values are the rows (``experts``).
        columns: the axis whose values are the columns (``mlp_ratio``).
        value: the metric in the cells; default: the first of ``table.metrics``.
    """

    rows: str
    columns: str
    value: str | None = None


class TableSpec(_Strict):
    """The result table (``sweetspot table``, and the end of ``sweetspot run``).

    One row per configuration, seeds aggregated (mean ± sample std of the FINISHED ones), in the
    study's order; the best value of each metric column is bold (per group).

    Attributes:
        metrics: metrics read from MLflow (their last logged value); by default shown after the
            accounting columns, in this order.
        columns: every column shown, in order; default the paper's layout: ``name``,
            ``params_total_m``, ``params_active_m``, ``gflops``, the inference throughput, the
            ``metrics``, then the OOD top-1 accuracies, each where the trials logged it. A column is
            one of ``name``, ``params_total_m``, ``params_active_m``, ``gflops``, ``n`` (finished
            seeds), ``seeds``, ``status``, ``epoch``, a metric of ``metrics`` (or one the trials log
            by themselves: ``inference_images_per_s``, ``ood_<set>_top1``), or an axis of the study.
            A ``status`` column is added whenever a configuration has not FINISHED every seed.
        rows: keep only the configurations whose axes match every entry (a value or a list of
            values); a configuration with no value for the axis (an MoE axis of a dense baseline)
            is kept. Default: every configuration.
        group_by: an axis: configurations with the same value together, each group under its own
            heading, best values in bold per group.
        delta_vs_dense: each metric also shows its difference to the dense baseline of the same
            backbone (the dense configuration that shares most axis values with it).
        pivot: lay one metric out as a grid over two axes instead of one row per configuration.
    """

    metrics: list[str] = Field(default_factory=lambda: ["val_top1"], min_length=1)
    columns: list[str] | None = Field(None, min_length=1)
    rows: dict[str, Any] = Field(default_factory=dict)
    group_by: str | None = None
    delta_vs_dense: bool = False
    pivot: PivotSpec | None = None


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
        stall_timeout_s: a trial whose training makes no progress for this long (no step,
            evaluation batch or epoch: a hung collective, a stopped process, a dead file system)
            is aborted and FAILED as stalled; ``null`` never gives up on one. Counted from the
            first sign of life of its workers, so queueing for resources is not a stall.
        resources: workers and devices per trial, concurrency.
        scheduler: optional early stopping of trials that fall behind the others (ASHA); default
            none: every trial runs all its epochs.
        stop: optional rule that stops any trial once a metric reaches a threshold.
        tracking: MLflow location.
        output: folder for the tracking store, Ray results and checkpoints; default ``runs/<name>``.
        storage_path: where Ray Tune and Ray Train keep the trials' state and checkpoints, when
            not in ``output``: on a cluster, storage every node reaches (a shared filesystem path,
            or a URI such as ``s3://bucket/studies``).
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
    stall_timeout_s: float | None = Field(1800.0, gt=0)
    resources: ResourcesSpec = ResourcesSpec()
    scheduler: SchedulerSpec | None = None
    stop: StopSpec | None = None
    tracking: TrackingSpec = TrackingSpec()
    output: str | None = None
    storage_path: str | None = Field(None, min_length=1)
    table: TableSpec = TableSpec()

    @property
    def output_dir(self) -> Path:
        return Path(self.output if self.output is not None else f"runs/{self.name}").resolve()

    @property
    def remote_storage(self) -> bool:
        """Whether Ray's storage is a URI (object store) rather than a filesystem path."""
        return self.storage_path is not None and "://" in self.storage_path

    @property
    def ray_storage(self) -> str:
        """Ray's storage root: ``storage_path`` (a relative path from here), else ``<output>/ray``."""
        if self.storage_path is None:
            return str(self.output_dir / "ray")
        if self.remote_storage:
            return self.storage_path.rstrip("/")
        return str(Path(self.storage_path).expanduser().resolve())

    @property
    def train_storage(self) -> str:
        """Ray Train's storage: one run folder per trial, holding its checkpoints."""
        return f"{self.ray_storage}/train"

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
    problems = _check_axes(spec, source) + _check_table(spec, source)
    if problems:
        raise StudyError(problems)
    return spec, source


def problem_from_error(source: Source, err: Any, prefix: tuple[PathKey, ...]) -> Problem:
    """A Pydantic error (one entry of ``errors()``) as a located, one-line Problem."""
    loc = (*prefix, *(key for key in err["loc"] if not _is_union_member(key)))
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


def _is_union_member(key: PathKey) -> bool:
    """Pydantic names the member of a union a value failed (``placement.list[int]``); the YAML does not."""
    return isinstance(key, str) and ("[" in key or key in ("str", "int", "float", "bool", "none"))


def _did_you_mean(source: Source, loc: tuple[PathKey, ...]) -> str:
    model: Any = StudySpec
    if loc[:1] in (("grid",), ("cases",)) and len(loc) > 3:
        # Inside a grid value or a case entry: its axis names a field of the trial config.
        try:
            model, loc = TrialConfig, (*resolve_axis(str(loc[1] if loc[0] == "grid" else loc[2])), *loc[3:])
        except ValueError:
            return ""
    for key in loc[:-1]:
        if isinstance(key, int):
            continue  # an item of a list of models (``data.ood[0]``): the model came with the list
        field = model.model_fields.get(key)
        annotation = _inner_model(field.annotation) if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _inner_model(annotation: Any) -> Any:
    """``SchedulerSpec | None`` → ``SchedulerSpec``, ``list[OODSet]`` → ``OODSet``; any other
    annotation unchanged."""
    if get_origin(annotation) in (Union, UnionType):
        models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    if get_origin(annotation) is list:
        return get_args(annotation)[0]
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


def _check_table(spec: StudySpec, source: Source) -> list[Problem]:
    """The ``table:`` section names axes of this study, metrics it collects, and values its axes take."""
    table, axes = spec.table, _study_axes(spec)
    problems: list[Problem] = []

    def axis(name: str, where: tuple[PathKey, ...]) -> str | None:
        try:
            label = axis_label(resolve_axis(name))
        except ValueError as error:
            problems.append(source.problem(where, str(error)))
            return None
        if label not in axes:
            known = ", ".join(axes) or "none: it has no grid or cases"
            problems.append(
                source.problem(where, f"{name!r} is not an axis of this study (its axes: {known})")
            )
            return None
        return label

    def metric(name: str, where: tuple[PathKey, ...]) -> None:
        if name not in table.metrics and not FINAL_METRICS.fullmatch(name):
            problems.append(source.problem(where, f"{name!r} is not one of table.metrics {table.metrics}"))

    for index, column in enumerate(table.columns or []):
        if column in CONFIG_COLUMNS or column in table.metrics or FINAL_METRICS.fullmatch(column):
            continue
        try:
            resolve_axis(column)
        except ValueError:
            problems.append(source.problem(("table", "columns", index), _unknown_column(column, table, axes)))
            continue
        axis(column, ("table", "columns", index))
    for name, wanted in table.rows.items():
        label = axis(name, ("table", "rows", name))
        if label is not None and not _takes(axes[label], wanted):
            values = ", ".join(map(str, axes[label]))
            reason = f"{wanted!r} is not a value of {name!r} in this study ({values})"
            problems.append(source.problem(("table", "rows", name), reason))
    if table.group_by is not None:
        axis(table.group_by, ("table", "group_by"))
    if table.pivot is not None:
        rows = axis(table.pivot.rows, ("table", "pivot", "rows"))
        columns = axis(table.pivot.columns, ("table", "pivot", "columns"))
        if rows is not None and rows == columns:
            problems.append(
                source.problem(("table", "pivot", "columns"), "rows and columns need two different axes")
            )
        if table.pivot.value is not None:
            metric(table.pivot.value, ("table", "pivot", "value"))
    return problems


def _unknown_column(column: str, table: TableSpec, axes: dict[str, list[Any]]) -> str:
    known = [*CONFIG_COLUMNS, *table.metrics, *axes]
    close = difflib.get_close_matches(column, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"unknown column {column!r}: not one of {', '.join(CONFIG_COLUMNS)}, an axis, or a metric of "
        f"table.metrics {table.metrics} (list a metric there to show it){hint}"
    )


def _study_axes(spec: StudySpec) -> dict[str, list[Any]]:
    """Axis label → the values the grid and the cases give it (names that do not resolve are skipped:
    :func:`_check_axes` reports them)."""
    axes: dict[str, list[Any]] = {}
    entries = [(axis, value) for axis, values in spec.grid.items() for value in values]
    entries += [(axis, value) for case in spec.cases for axis, value in case.items()]
    for name, value in entries:
        try:
            label = axis_label(resolve_axis(name))
        except ValueError:
            continue
        axes.setdefault(label, [])
        if value not in axes[label]:
            axes[label].append(value)
    return axes


def _takes(values: list[Any], wanted: Any) -> bool:
    """Whether a ``rows`` entry (a value or a list of values) names values the axis takes."""
    if wanted in values:
        return True
    return isinstance(wanted, list) and bool(wanted) and all(item in values for item in wanted)
