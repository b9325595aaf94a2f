"""Study → trials: cases × grid × seeds, minus exclusions, deduplicated by trial hash.

Every resolved trial is validated as a :class:`~trainer.config.TrialConfig`; an
invalid combination is reported at the YAML value that produced it (a grid value,
a case entry, or the base field).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from orchestrator.source import PathKey, Problem, Source, StudyError
from orchestrator.spec import StudySpec, axis_label, problem_from_error, resolve_axis
from trainer.config import TrialConfig
from trainer.models.registry import BACKBONES

# The axes a paper-style name already spells out; other varied axes are appended.
_NAMED_AXES = {
    ("model", "backbone"),
    ("model", "placement"),
    ("model", "moe", "experts"),
    ("model", "moe", "top_k"),
}


# A field of the trial config the grid or a case set, and where the study file sets it.
Origin = tuple[tuple[str, ...], tuple[PathKey, ...]]


@dataclass(frozen=True)
class Trial:
    """One fully resolved configuration × one seed.

    Attributes:
        index: position in study order (tables list trials in this order).
        config: the validated trial config.
        name: paper-style name of the configuration, the same for every seed.
        axes: label → value of every axis the study sets (``None`` for MoE axes of a dense trial).
        origins: each field the grid or a case set (its path in the trial config) and where in
            the study file it was written, in the order applied; see :meth:`origin`.
    """

    index: int
    config: TrialConfig
    name: str
    axes: dict[str, Any] = field(default_factory=dict)
    origins: tuple[Origin, ...] = field(default=(), compare=False, repr=False)

    @property
    def hash(self) -> str:
        return self.config.trial_hash

    @property
    def short_hash(self) -> str:
        return self.hash[:12]

    @property
    def seed(self) -> int:
        return self.config.seed

    def origin(self, path: tuple[str, ...]) -> tuple[PathKey, ...]:
        """Where the study file sets this trial's field ``path`` (``("data", "root")``): inside
        the grid value or case entry that set it or a section holding it, else under ``base``
        (:meth:`Source.problem` points at the deepest part of it that is written)."""
        for set_path, where in reversed(self.origins):
            if path[: len(set_path)] == set_path:
                return (*where, *path[len(set_path) :])
            if set_path[: len(path)] == path:
                return where
        return ("base", *path)


@dataclass(frozen=True)
class _Override:
    path: tuple[str, ...]
    value: Any
    origin: tuple[PathKey, ...]  # where in the YAML it was written


def expand(spec: StudySpec, source: Source) -> list[Trial]:
    """All trials of the study, in study order.

    Raises:
        StudyError: a combination does not validate (located at the value that caused it),
            a case and the grid set the same axis, or nothing is left to run.
    """
    grid = [(axis, resolve_axis(axis), values) for axis, values in spec.grid.items()]
    cases = spec.cases or [{}]
    # Trials are validated from what the YAML wrote, not from the validated base: a recipe
    # preset fills only the fields nobody wrote, so a grid over presets must start unresolved.
    written = source.data.get("base", {}) if isinstance(source.data, dict) else {}
    base = spec.base.model_dump(mode="python")
    axis_paths = [path for _, path, _ in grid]
    for case in cases:
        axis_paths += [resolve_axis(axis) for axis in case if resolve_axis(axis) not in axis_paths]

    problems: dict[str, Problem] = {}
    configs: dict[str, TrialConfig] = {}
    origins: dict[str, tuple[Origin, ...]] = {}
    # Where each top_k was written → whether a trial that is not Soft MoE uses it.
    top_k_used: dict[tuple[PathKey, ...], bool] = {}
    for case_index, case in enumerate(cases):
        case_overrides = [
            _Override(resolve_axis(axis), value, ("cases", case_index, axis)) for axis, value in case.items()
        ]
        clash = {o.path for o in case_overrides} & {path for _, path, _ in grid}
        for override in case_overrides:
            if override.path in clash:
                problem = source.problem(override.origin, "this axis is also a grid axis; set it in one place")
                problems[str(problem)] = problem
        for choice in itertools.product(*(range(len(values)) for _, _, values in grid)):
            overrides = case_overrides + [
                _Override(path, values[i], ("grid", axis, i)) for (axis, path, values), i in zip(grid, choice)
            ]
            for seed in spec.seeds:
                data, full = copy.deepcopy(written), copy.deepcopy(base)
                for override in overrides:
                    _set(data, override.path, override.value)
                    _set(full, override.path, override.value)
                data["seed"] = seed
                if any(_matches(rule, full) for rule in spec.exclude):
                    continue
                try:
                    config = TrialConfig.model_validate(data)
                except ValidationError as error:
                    for err in error.errors():
                        problem = _locate(source, err, overrides, spec)
                        problems.setdefault(str(problem), problem)
                    continue
                shard_error = _expert_sharding_error(config, spec.resources.workers)
                if shard_error is not None:
                    problem = _locate(source, shard_error, overrides, spec)
                    problems.setdefault(str(problem), problem)
                    continue
                configs.setdefault(config.trial_hash, config)  # dense duplicates collapse here
                origins.setdefault(config.trial_hash, tuple((o.path, o.origin) for o in overrides))
                _note_top_k(config, overrides, written, top_k_used)
    for where, used in top_k_used.items():
        if not used:
            problem = source.problem(where, _SOFT_TOP_K)
            problems.setdefault(str(problem), problem)
    if problems:
        raise StudyError(list(problems.values()))
    if not configs:
        raise StudyError([source.problem(("exclude",), "the study expands to zero trials")])

    # A name spells out backbone, experts, placement and k; where that leaves two configurations
    # with one name, the axes that tell them apart are appended (seeds share a name).
    homonyms: dict[str, list[TrialConfig]] = {}
    for config in configs.values():
        homonyms.setdefault(trial_name(config), []).append(config)
    varied = {
        name: _varied_axes(group, axis_paths) if len(group) > 1 else [] for name, group in homonyms.items()
    }
    return [
        Trial(
            index=index,
            config=config,
            name=trial_name(config, varied[trial_name(config)]),
            axes={axis_label(path): _get(config.canonical(), path) for path in axis_paths},
            origins=origins[trial_hash],
        )
        for index, (trial_hash, config) in enumerate(configs.items())
    ]


def trial_name(config: TrialConfig, varied: list[tuple[str, ...]] = ()) -> str:
    """Paper-style name: "ViT-S-8 Every 2 Top 2", "ConvNeXt-T", "ConvNeXt-S-8 (iso.) Last 2 Top 1".

    Axes in ``varied`` that the name does not spell out are appended (``, mlp_ratio=2``); the
    expansion passes the axes that tell apart configurations that would otherwise share a name.
    """
    model = config.model
    backbone = BACKBONES[model.backbone]
    parts = [backbone.display]
    if not model.is_dense:
        parts[0] += f"-{model.moe.experts}"
    if backbone.family == "convnext_iso":
        parts.append("(iso.)")
    if not model.is_dense:
        parts.append(placement_label(model.placement))
        # Only token choice has a per-token k; the other routers are named by their kind.
        parts.append({"soft": "Soft", "expert_choice": "Expert Choice"}.get(model.moe.router, f"Top {model.moe.top_k}"))
    name = " ".join(parts)
    canonical = config.canonical()
    extras = []
    for path in varied:
        value = _get(canonical, path)
        if path not in _NAMED_AXES and value is not None:
            extras.append(f"{axis_label(path)}={_format(value)}")
    return ", ".join([name, *extras])


def placement_label(placement: str | list[int]) -> str:
    if isinstance(placement, list):
        return "Blocks " + ",".join(str(i) for i in placement)
    if placement.startswith("last:"):
        return f"Last {placement.split(':', 1)[1]} blocks"
    return {"every2": "Every 2", "last2": "Last 2", "last3": "Last 3", "stage": "Stage"}.get(
        placement, placement
    )


def _varied_axes(configs: list[TrialConfig], paths: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    canonical = [c.canonical() for c in configs]
    return [p for p in paths if len({repr(_get(c, p)) for c in canonical if _get(c, p) is not None}) > 1]


def _locate(source: Source, err: Any, overrides: list[_Override], spec: StudySpec) -> Problem:
    """Point an error at the override that set the failing field (inside it, when it set a whole
    section such as ``data``), else at ``base``."""
    loc = tuple(err["loc"])
    for override in reversed(overrides):
        within = loc[: len(override.path)] == override.path
        if within or override.path[: len(loc)] == loc:
            rest = loc[len(override.path) :] if within else ()
            problem = problem_from_error(source, {**err, "loc": rest}, override.origin)
            combo = ", ".join(
                f"{axis_label(o.path)}={_format(o.value)}" for o in overrides if o.origin[0] == "grid"
            )
            hint = f" (in the combination {combo}; an 'exclude' rule can skip it)" if combo else ""
            return Problem(problem.file, problem.line, problem.column, problem.field, problem.reason + hint)
    return problem_from_error(source, err, ("base",))


_SOFT_TOP_K = (
    "top_k has no effect with router 'soft' (each Soft MoE slot is a weighted mix of all tokens: no "
    "token picks k experts); remove it here, or pair it with a token-choice or expert_choice router"
)


def _note_top_k(
    config: TrialConfig,
    overrides: list[_Override],
    written: dict[str, Any],
    used: dict[tuple[PathKey, ...], bool],
) -> None:
    """Record where this MoE trial's top_k was written and whether its router uses it.

    A top_k that only ever reaches Soft MoE trials is a mistake in the study (a grid over it
    would only make duplicates); one that also reaches another router is fine: Soft MoE ignores it.
    So is one in ``base`` next to another router: a default that the cases override.
    """
    if config.model.is_dense:
        return
    path = ("model", "moe", "top_k")
    where = next((o.origin for o in reversed(overrides) if o.path == path), None)
    if where is None:
        if _get(written, path) is None or _get(written, ("model", "moe", "router")) != "soft":
            return  # the default, or a default for other routers
        where = ("base", *path)
    used[where] = used.get(where, False) or config.model.moe.router != "soft"


def _expert_sharding_error(config: TrialConfig, workers: int) -> dict[str, Any] | None:
    """Expert parallelism splits the experts evenly over the workers; say so before launch."""
    moe = config.model.moe
    if config.model.is_dense or not moe.expert_parallel or workers == 1 or moe.experts % workers == 0:
        return None
    return {
        "loc": ("model", "moe", "experts"),
        "type": "value_error",
        "msg": f"{moe.experts} experts do not split evenly over {workers} workers (expert parallelism); "
        "use a multiple of resources.workers or set model.moe.expert_parallel: false",
    }


def _matches(rule: dict[str, Any], data: dict[str, Any]) -> bool:
    for axis, wanted in rule.items():
        value = _get(data, resolve_axis(axis))
        if not (value == wanted or (isinstance(wanted, list) and value in wanted)):
            return False
    return True


def _get(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = copy.deepcopy(value)


def _format(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
