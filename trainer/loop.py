"""Train and evaluate one trial on this rank.

One code path for Ray Train workers (:func:`worker`, the ``train_loop_per_worker``)
and standalone runs (``python -m trainer`` / ``torchrun -m trainer``). The process
group, when there is one, is already initialised by whoever launched us.
"""

from __future__ import annotations

import functools
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from trainer import recipe as recipes
from trainer.analysis import analyze_routing, save_routing
from trainer.checkpoint import CHECKPOINT_FILE, FALLBACK_KEY, load_newest
from trainer.config import TrialConfig
from trainer.data import OODEval, input_spec, load_datasets, load_ood_sets, restrict_logits
from trainer.heartbeat import Heartbeat
from trainer.live_metrics import LiveMetrics, expert_shares
from trainer.models import MoEModel, build_model
from trainer.models.accounting import time_inference
from trainer.moe import parallel
from trainer.moe.layer import resolve_backend
from trainer.report import RayTrainReporter, Reporter

ROUTING_FILE = "routing.npz"
_EVAL_BATCH = 256
# A file to append this rank's timeline to (training starts, its first step, each epoch's end,
# training ends): bench/orchestration.py splits a trial's wall time into training and overhead
# with it, and the resume tests count the epochs each trial trained.
TIMELINE_ENV = "SWEETSPOT_TIMELINE"


def worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config["trial"]`` is a ``TrialConfig`` as JSON-able dict.

    ``config["init_checkpoint"]``: the weights a fine-tuning or linear-probe trial starts from,
    resolved by the orchestrator from ``recipe.init_from``.
    """
    init = config.get("init_checkpoint")
    reporter = RayTrainReporter(trial_name=config.get("name", ""), watchdog=config.get("watchdog"))
    train(TrialConfig.model_validate(config["trial"]), reporter, Path(init) if init else None)


@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    device: torch.device

    @classmethod
    def current(cls) -> _Dist:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        return cls(rank, world, device)

    def expert_group(self, trial: TrialConfig) -> dist.ProcessGroup | None:
        """The group MoE layers shard their experts over, or None to replicate them."""
        moe_sharded = not trial.model.is_dense and trial.model.moe.expert_parallel
        return dist.group.WORLD if moe_sharded and self.world > 1 else None

    def all_sum(self, values: list[float]) -> list[float]:
        # float64 so that summed counts of a large validation set stay exact.
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()


def train(trial: TrialConfig, reporter: Reporter, init_checkpoint: Path | None = None) -> None:
    """Train ``trial`` for its recipe's epochs, reporting metrics and a checkpoint every epoch.

    Resumes from the reporter's latest checkpoint when there is one, so a restarted trial
    continues at the next epoch with its optimizer, schedule and RNG state. Otherwise a
    ``finetune`` / ``linear_probe`` trial starts from ``init_checkpoint``'s weights.
    After the last epoch it also scores the OOD sets, measures inference throughput and
    saves the routing analysis (``routing.npz``) next to the last checkpoint.
    """
    env = _Dist.current()
    _mark("train_start", env, trial)
    beat = reporter.heartbeat(trial, send=env.rank == 0)
    beat("start", 0)
    recipe = trial.recipe
    if recipe.batch_size % env.world:
        raise ValueError(f"batch_size {recipe.batch_size} is not divisible by {env.world} workers")
    local_batch = recipe.batch_size // env.world
    if (recipe.mixup > 0 or recipe.cutmix > 0) and local_batch % 2:
        raise ValueError(f"mixup/cutmix need an even batch per worker, but it is {local_batch}")
    _seed_everything(trial.seed)

    spec = input_spec(trial.data)
    train_tf, eval_tf = recipes.build_transforms(recipe, spec.img_size)
    train_set, val_set = load_datasets(trial.data, train_tf, eval_tf)
    sampler = recipes.build_sampler(train_set, recipe, env.rank, env.world, trial.seed)
    # Samplers give every rank the same count and drop_last the same steps, as DDP requires.
    train_loader = DataLoader(
        train_set, batch_size=local_batch, sampler=sampler, drop_last=True, num_workers=trial.data.num_workers
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"batch_size {recipe.batch_size} is larger than the {len(train_set)} training images"
        )
    val_loader = _eval_loader(val_set, env, trial.data.num_workers)

    expert_group = env.expert_group(trial)
    model = build_model(trial.model, spec, device=env.device, expert_group=expert_group)
    beat("start", 0)
    if recipe.mode != "train":
        _start_from(model, trial, init_checkpoint, reporter, expert_group)
    optimizer = recipes.build_optimizer(model, recipe, _expert_parameters(model))
    scheduler = recipes.build_scheduler(optimizer, recipe, len(train_loader))
    start_epoch, restored_metrics, resumes = _restore(reporter, model, optimizer, scheduler, expert_group)
    ddp: torch.nn.Module = model
    if env.world > 1:
        # Sharded experts get their gradients through the all-to-all, not DDP's all-reduce.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, parallel.expert_parallel_names(model)
        )
        ddp = DistributedDataParallel(model)
    if restored_metrics:
        # The checkpoint may have been saved after its metrics stopped reaching the tracker
        # (an interrupt in between); report them again, the tracker keeps the first copy.
        reporter.report(restored_metrics, None)

    step = _Step(
        ddp,
        model,
        optimizer,
        scheduler,
        recipes.TrainLoss(recipe),
        recipes.build_mixup(recipe, spec.num_classes),
        trial,
        env,
        expert_group,
        reporter.live_metrics(trial) if env.rank == 0 else None,
        beat,
    )
    _mark("first_step", env, trial)
    for epoch in range(start_epoch, recipe.epochs):
        sampler.set_epoch(epoch)
        train_metrics = step.epoch(train_loader, epoch)
        val_metrics = evaluate(model, val_loader, env, beat=functools.partial(beat, "evaluation", epoch))
        metrics = {
            "epoch": epoch + 1,
            "epochs_total": recipe.epochs,
            **train_metrics,
            **val_metrics,
            "lr": optimizer.param_groups[0]["lr"],
            # How often this trial restarted from a checkpoint (a lost worker, a killed driver).
            "resumes": resumes,
        }
        if not trial.model.is_dense:
            metrics["moe_backend"] = resolve_backend(trial.model.moe)
        last = epoch + 1 == recipe.epochs
        routing: dict[str, np.ndarray] = {}
        if last:
            metrics.update(_final_metrics(model, trial, eval_tf, env))
            routing = analyze_routing(model, val_loader, env.device, spec.num_classes)
        # Gathering sharded experts is a collective: every rank builds the state.
        state = _checkpoint_state(model, optimizer, scheduler, epoch, metrics, resumes, expert_group)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if env.rank == 0:
                checkpoint = Path(folder)
                torch.save(state, checkpoint / CHECKPOINT_FILE)
                if routing:
                    save_routing(checkpoint / ROUTING_FILE, routing)
            reporter.report(metrics, checkpoint)
        _mark("epoch_end", env, trial, epoch=epoch + 1)
    _mark("train_end", env, trial)


def _mark(event: str, env: _Dist, trial: TrialConfig, **details: Any) -> None:
    """Append ``event`` with the wall-clock time to the timeline file, when one is asked for."""
    path = os.environ.get(TIMELINE_ENV)
    if path:
        record = {
            "event": event,
            "time": time.time(),
            "trial": trial.trial_hash,
            "rank": env.rank,
            "pid": os.getpid(),
            **details,
        }
        with open(path, "a") as timeline:
            timeline.write(json.dumps(record) + "\n")


def _final_metrics(model: MoEModel, trial: TrialConfig, eval_tf: Any, env: _Dist) -> dict[str, float]:
    """Every OOD set's accuracy, and inference throughput, on the trained model."""
    metrics: dict[str, float] = {}
    for ood in load_ood_sets(trial.data, eval_tf):
        scores = evaluate(model, _eval_loader(ood.dataset, env, trial.data.num_workers), env, ood)
        metrics.update({f"ood_{ood.name}_{key.removeprefix('val_')}": v for key, v in scores.items()})
    # The same measurement as `sweetspot plan --measure`, on the trained model and the trial's
    # own hardware: per worker, at a fixed batch.
    metrics["inference_images_per_s"] = time_inference(model, input_spec(trial.data), env.device)
    return metrics


def _eval_loader(dataset: Dataset, env: _Dist, num_workers: int) -> DataLoader:
    return DataLoader(
        _ValShard(dataset, env.rank, env.world),
        batch_size=_EVAL_BATCH,
        shuffle=False,
        num_workers=num_workers,
    )


def _expert_parameters(model: MoEModel) -> list[torch.nn.Parameter]:
    return [p for layer in model.moe_layers() for p in layer.expert_parameters()]


def _start_from(
    model: MoEModel,
    trial: TrialConfig,
    init_checkpoint: Path | None,
    reporter: Reporter,
    expert_group: dist.ProcessGroup | None,
) -> None:
    """Load ``init_checkpoint``'s weights for fine-tuning or linear probing.

    A classifier of another shape (ImageNet-21k → 1k) is left newly initialised. Linear
    probing then freezes everything but the classifier. A resumed trial loads its own
    checkpoint afterwards, so the weights loaded here only matter at the very start.
    """
    with reporter.latest_checkpoint() as own:
        resuming = own is not None
    if not resuming:
        if init_checkpoint is None:
            raise ValueError(
                f"recipe.mode {trial.recipe.mode!r} needs the checkpoint of recipe.init_from "
                f"({trial.recipe.init_from!r}); run the trial through `sweetspot run` or pass --init"
            )
        path = init_checkpoint / CHECKPOINT_FILE if init_checkpoint.is_dir() else init_checkpoint
        if not path.is_file():
            raise FileNotFoundError(f"init checkpoint {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=False)["model"]
        head = _classifier_names(model)
        own_state = model.state_dict()
        for name in head & state.keys():
            if state[name].shape != own_state[name].shape:
                del state[name]  # a new head for a new label space (classifiers are never sharded)
        missing = sorted(own_state.keys() - state.keys() - head)
        unexpected = sorted(state.keys() - own_state.keys())
        if missing or unexpected:
            raise ValueError(
                f"init checkpoint {path} does not fit model {trial.model.backbone} "
                f"(placement {trial.model.placement}): missing {_few(missing)}; unexpected {_few(unexpected)}"
            )
        full = parallel.full_model_state(model, expert_group)
        full.update(state)
        parallel.load_full_model_state(model, full, expert_group)
    if trial.recipe.mode == "linear_probe":
        for name, param in model.named_parameters():
            param.requires_grad_(name in _classifier_names(model))


def _classifier_names(model: MoEModel) -> set[str]:
    """State-dict names of the final classifier's weight and bias."""
    classifier = model.backbone.get_classifier() if hasattr(model.backbone, "get_classifier") else None
    if classifier is None:
        raise ValueError(f"backbone {model.cfg.backbone} has no classifier to replace")
    ids = {id(p) for p in classifier.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def _few(names: list[str]) -> str:
    return (", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")) or "nothing"


@dataclass
class _Step:
    """One epoch of optimisation; holds what every step needs."""

    ddp: torch.nn.Module
    model: MoEModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: recipes.TrainLoss
    mixup: Mixup | None
    trial: TrialConfig
    env: _Dist
    expert_group: dist.ProcessGroup | None
    live: LiveMetrics | None = None  # rank 0 under Ray: gauges updated during the epoch
    beat: Heartbeat = field(default_factory=Heartbeat)  # rank 0 under Ray: the stall watchdog's

    def epoch(self, loader: DataLoader, epoch: int) -> dict[str, float]:
        env, model = self.env, self.model
        # A linear probe keeps the frozen backbone in inference mode (no drop path, no gate noise).
        self.ddp.train(self.trial.recipe.mode != "linear_probe")
        steps_per_epoch = len(loader)
        loss_sum = aux_sum = 0.0
        routing_sums: dict[str, float] = {}
        images = 0
        started = time.perf_counter()
        for step, (inputs, targets) in enumerate(loader):
            self.beat("training", epoch, step)
            inputs, targets = (
                inputs.to(env.device, non_blocking=True),
                targets.to(env.device, non_blocking=True),
            )
            if self.mixup is not None:
                inputs, targets = self.mixup(inputs, targets)
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.device.type == "cuda"):
                logits = self.ddp(inputs)
                task_loss = self.loss_fn(logits, targets)
                aux_loss = model.aux_loss()
                loss = task_loss + aux_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1}: "
                    f"task loss {task_loss.item()}, aux loss {aux_loss.item()}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.trial.recipe.grad_clip > 0:
                parallel.clip_grad_norm_(model, self.trial.recipe.grad_clip, self.expert_group)
            self.optimizer.step()
            self.scheduler.step_update(num_updates=epoch * steps_per_epoch + step + 1)

            loss_sum += task_loss.item()
            aux_sum += aux_loss.item()
            for key, value in model.routing_stats().items():
                routing_sums[key] = routing_sums.get(key, 0.0) + value
            images += inputs.shape[0]
            if self.live is not None and self.live.due():
                steps = step + 1
                # Rank 0's running means; its throughput × world stands for the trial's.
                running = {"train_loss": loss_sum / steps, "aux_loss": aux_sum / steps, "epoch": epoch + 1}
                running |= {key: total / steps for key, total in routing_sums.items()}
                running["images_per_s"] = images * env.world / max(time.perf_counter() - started, 1e-9)
                self.live.update(running, expert_shares(model))
        elapsed = time.perf_counter() - started
        routing_keys = sorted(routing_sums)
        totals = env.all_sum([loss_sum, aux_sum, float(images), *(routing_sums[k] for k in routing_keys)])
        # Every rank ran the same number of steps, so the global mean divides by world × steps.
        denominator = env.world * steps_per_epoch
        metrics = {
            "train_loss": totals[0] / denominator,
            "aux_loss": totals[1] / denominator,
            "images_per_s": totals[2] / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
        }
        metrics.update(
            {key: total / denominator for key, total in zip(routing_keys, totals[3:], strict=True)}
        )
        return metrics


@torch.no_grad()
def evaluate(
    model: MoEModel,
    loader: DataLoader,
    env: _Dist,
    ood: OODEval | None = None,
    beat: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and loss over the whole split, summed across ranks.

    For an OOD set, logits are first restricted to the classes it contains. ``beat(batch)``
    is called before each batch (the stall watchdog's heartbeat).
    """
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    for batch, (inputs, targets, real) in enumerate(loader):
        if beat is not None:
            beat(batch)
        inputs, targets, real = inputs.to(env.device), targets.to(env.device), real.to(env.device)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.device.type == "cuda"):
            logits = model(inputs).float()
        if ood is not None:
            logits = restrict_logits(logits, ood.class_indices.to(logits.device))
        loss_sum += (F.cross_entropy(logits, targets, reduction="none") * real).sum().item()
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = ranked.eq(targets[:, None]) & real[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        count += real.sum().item()
    loss_sum, top1, top5, count = env.all_sum([loss_sum, top1, top5, count])
    if count == 0:
        raise ValueError("the validation split is empty")
    return {"val_loss": loss_sum / count, "val_top1": 100 * top1 / count, "val_top5": 100 * top5 / count}


class _ValShard(Dataset):
    """Rank ``rank``'s strided share of the validation split, padded to the same length on every rank.

    Equal lengths keep every rank in step through the same batches, which expert-parallel
    all-to-alls require; padding repeats the last image and is marked not ``real``, so every
    validation image is counted exactly once.
    """

    def __init__(self, dataset: Dataset, rank: int, world: int) -> None:
        self.dataset = dataset
        self.indices = list(range(rank, len(dataset), world))
        self.length = -(-len(dataset) // world)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        real = i < len(self.indices)
        image, label = self.dataset[self.indices[i] if real else self.indices[-1] if self.indices else 0]
        return image, label, real


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _checkpoint_state(
    model: MoEModel,
    optimizer: Any,
    scheduler: Any,
    epoch: int,
    metrics: dict[str, Any],
    resumes: int,
    expert_group: dist.ProcessGroup | None,
) -> dict[str, Any]:
    """Everything a resume needs, with sharded experts gathered so any world size can load it.

    Checkpoints are taken at epoch ends, so the sampler's position is the epoch itself
    (``set_epoch`` reshuffles deterministically from it). bf16 autocast needs no loss scaler.
    """
    return {
        "epoch": epoch,
        "metrics": metrics,
        "resumes": resumes,
        "model": parallel.full_model_state(model, expert_group),
        "optimizer": parallel.full_optimizer_state(optimizer, expert_group),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        },
    }


def _restore(
    reporter: Reporter,
    model: MoEModel,
    optimizer: Any,
    scheduler: Any,
    expert_group: dist.ProcessGroup | None,
) -> tuple[int, dict[str, Any] | None, int]:
    """Load the newest checkpoint that loads, if any: (first epoch still to train, its epoch's
    metrics, resumes).

    Every rank loads the same one: rank 0's list of checkpoints, and only one that every rank
    could read (:func:`trainer.checkpoint.load_newest`). When newer checkpoints were skipped,
    the metrics say so under ``checkpoint_fallback`` (the trial's MLflow run gets a tag).
    """
    env = _Dist.current()
    candidates = reporter.checkpoints() if env.rank == 0 else []
    if env.world > 1:
        shared = [candidates]
        dist.broadcast_object_list(shared, src=0)
        candidates = shared[0]
    resumed = load_newest(candidates, lambda ok: env.all_sum([0.0 if ok else 1.0])[0] == 0)
    state = resumed.state
    if state is None:
        return 0, None, 0
    parallel.load_full_model_state(model, state["model"], expert_group)
    parallel.load_full_optimizer_state(optimizer, state["optimizer"], expert_group)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    # "metrics" and "resumes" are absent in checkpoints before 0.1.0.
    metrics = state.get("metrics")
    if metrics is not None and resumed.fallback:
        metrics = {**metrics, FALLBACK_KEY: resumed.fallback}
    return int(state["epoch"]) + 1, metrics, int(state.get("resumes", 0)) + 1
