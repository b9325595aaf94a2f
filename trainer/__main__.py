"""Standalone training of one trial, without Ray or MLflow.

    python -m trainer --trial trial.json --out runs/x              # one process
    torchrun --nproc-per-node 2 -m trainer --trial trial.json --out runs/x

``trial.json`` is a ``TrialConfig`` (``sweetspot plan STUDY.yaml --format json`` writes them).
Metrics go to stdout and ``OUT/metrics.jsonl``; the latest checkpoint to ``OUT/checkpoint``,
from which a rerun resumes. A ``finetune`` / ``linear_probe`` trial starts from ``--init``
(a checkpoint folder or ``state.pt``), or from its ``recipe.init_from`` when that is one.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import TrialConfig
from trainer.loop import train
from trainer.report import LocalReporter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n")[0])
    parser.add_argument("--trial", type=Path, required=True, help="TrialConfig as JSON")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics and checkpoints")
    parser.add_argument("--init", type=Path, help="checkpoint a finetune / linear_probe trial starts from")
    args = parser.parse_args(argv)

    trial = TrialConfig.model_validate_json(args.trial.read_text())
    init = args.init
    if init is None and trial.recipe.init_from and not trial.recipe.init_from.endswith((".yaml", ".yml")):
        init = Path(trial.recipe.init_from).expanduser()
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        args.out.mkdir(parents=True, exist_ok=True)
        train(trial, LocalReporter(args.out, rank=rank), init)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
