"""Train and evaluate one trial on this rank.

One code path for Ray Train workers (:func:`worker`, the ``train_loop_per_worker``)
and standalone runs (``python -m trainer`` / ``torchrun -m trainer``). The process
group, when there is one, is already initialised by whoever launched us.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from trainer.config import TrialConfig
from trainer.data import input_spec, load_datasets
from trainer.models import MoEModel, build_model
from trainer.models.accounting import time_inference
from trainer.moe import parallel
from trainer.moe.layer import resolve_backend
from trainer.report import RayTrainReporter, Reporter

CHECKPOINT_FILE = "state.pt"


def worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config["trial"]`` is a ``TrialConfig`` as JSON-able dict."""
    train(TrialConfig.model_validate(config["trial"]), RayTrainReporter())


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


def train(trial: TrialConfig, reporter: Reporter) -> None:
    """Train ``trial`` for its recipe's epochs, reporting metrics and a checkpoint every epoch.

    Resumes from the reporter's latest checkpoint when there is one, so a restarted
    trial continues at the next epoch with its optimizer, schedule and RNG state.
    """
    env = _Dist.current()
    recipe = trial.recipe
    if recipe.batch_size % env.world:
        raise ValueError(f"batch_size {recipe.batch_size} is not divisible by {env.world} workers")
    _seed_everything(trial.seed)

    train_set, val_set = load_datasets(trial.data)
    sampler = DistributedSampler(
        train_set, num_replicas=env.world, rank=env.rank, shuffle=True, seed=trial.seed, drop_last=True
    )
    # drop_last keeps every rank on the same number of steps, which DDP requires.
    train_loader = DataLoader(
        train_set,
        batch_size=recipe.batch_size // env.world,
        sampler=sampler,
        drop_last=True,
        num_workers=trial.data.num_workers,
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"batch_size {recipe.batch_size} is larger than the {len(train_set)} training images"
        )
    val_loader = DataLoader(_ValShard(val_set, env.rank, env.world), batch_size=256, shuffle=False)

    expert_group = env.expert_group(trial)
    model = build_model(trial.model, input_spec(trial.data), device=env.device, expert_group=expert_group)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=recipe.epochs,
        warmup_epochs=recipe.warmup_epochs,
        warmup_lr=recipe.lr * 1e-3,
        step_on_epochs=False,
        updates_per_epoch=len(train_loader),
    )
    start_epoch, restored_metrics = _restore(reporter, model, optimizer, scheduler, expert_group)
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

    for epoch in range(start_epoch, recipe.epochs):
        sampler.set_epoch(epoch)
        train_metrics = _train_epoch(ddp, model, train_loader, optimizer, scheduler, trial, epoch, env, expert_group)
        val_metrics = evaluate(model, val_loader, env)
        metrics = {
            "epoch": epoch + 1,
            "epochs_total": recipe.epochs,
            **train_metrics,
            **val_metrics,
            "lr": optimizer.param_groups[0]["lr"],
        }
        if not trial.model.is_dense:
            metrics["moe_backend"] = resolve_backend(trial.model.moe)
        if epoch + 1 == recipe.epochs:
            # The same measurement as `sweetspot plan --measure`, on the trained model and the
            # trial's own hardware: per worker, at a fixed batch.
            metrics["inference_images_per_s"] = time_inference(model, input_spec(trial.data), env.device)
        # Gathering sharded experts is a collective: every rank builds the state.
        state = _checkpoint_state(model, optimizer, scheduler, epoch, metrics, expert_group)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if env.rank == 0:
                checkpoint = Path(folder)
                torch.save(state, checkpoint / CHECKPOINT_FILE)
            reporter.report(metrics, checkpoint)


def _train_epoch(
    ddp: torch.nn.Module,
    model: MoEModel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trial: TrialConfig,
    epoch: int,
    env: _Dist,
    expert_group: dist.ProcessGroup | None,
) -> dict[str, float]:
    ddp.train()
    steps_per_epoch = len(loader)
    loss_sum = aux_sum = 0.0
    routing_sums: dict[str, float] = {}
    images = 0
    started = time.perf_counter()
    for step, (inputs, targets) in enumerate(loader):
        inputs, targets = inputs.to(env.device, non_blocking=True), targets.to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.device.type == "cuda"):
            logits = ddp(inputs)
            task_loss = F.cross_entropy(logits.float(), targets, label_smoothing=trial.recipe.label_smoothing)
            aux_loss = model.aux_loss()
            loss = task_loss + aux_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1}: "
                f"task loss {task_loss.item()}, aux loss {aux_loss.item()}"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if trial.recipe.grad_clip > 0:
            parallel.clip_grad_norm_(model, trial.recipe.grad_clip, expert_group)
        optimizer.step()
        scheduler.step_update(num_updates=epoch * steps_per_epoch + step + 1)

        loss_sum += task_loss.item()
        aux_sum += aux_loss.item()
        for key, value in model.routing_stats().items():
            routing_sums[key] = routing_sums.get(key, 0.0) + value
        images += inputs.shape[0]
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
    metrics.update({key: total / denominator for key, total in zip(routing_keys, totals[3:], strict=True)})
    return metrics


@torch.no_grad()
def evaluate(model: MoEModel, loader: DataLoader, env: _Dist) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and loss over the whole split, summed across ranks."""
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    for inputs, targets, real in loader:
        inputs, targets, real = inputs.to(env.device), targets.to(env.device), real.to(env.device)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.device.type == "cuda"):
            logits = model(inputs).float()
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
    expert_group: dist.ProcessGroup | None,
) -> dict[str, Any]:
    """Everything a resume needs, with sharded experts gathered so any world size can load it."""
    return {
        "epoch": epoch,
        "metrics": metrics,
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
    reporter: Reporter, model: MoEModel, optimizer: Any, scheduler: Any, expert_group: dist.ProcessGroup | None
) -> tuple[int, dict[str, Any] | None]:
    """Load the latest checkpoint, if any: (first epoch still to train, its epoch's metrics)."""
    with reporter.latest_checkpoint() as folder:
        if folder is None:
            return 0, None
        state = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    parallel.load_full_model_state(model, state["model"], expert_group)
    parallel.load_full_optimizer_state(optimizer, state["optimizer"], expert_group)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return int(state["epoch"]) + 1, state.get("metrics")  # absent in checkpoints before 0.1.0

