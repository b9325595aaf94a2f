"""MoE layer vs a dense MLP of the same *active* FLOPs: forward + backward time, side by side.

What is measured: one training step's compute for a single layer at ViT-S shapes
(``[batch, 197, 384]``, mlp_ratio 4): forward, ``loss = out.float().square().mean()`` (+ the
layer's ``aux_loss``), and ``loss.backward()``. The baseline for a top-k MoE is
``timm.layers.Mlp`` with hidden ``k · mlp_ratio · dim``, i.e. the FLOPs each token actually
uses; at capacity factor 1.25 the MoE's experts do up to 1.25x that work, so ~1.25x is the
floor a dispatch-free implementation could reach. Each row's dense and MoE steps alternate
within one loop (so clock or thermal drift hits both) and the median per step is reported.
CPU runs in float32; CUDA in bf16 autocast, synchronised around every step.

Reproduce, from the repository root::

    python -m bench.moe_layer                                  # CPU, the full default grid
    python -m bench.moe_layer --device cuda --batch 128 --format csv
    python -m bench.moe_layer --experts 8 --top-k 1 --backends native tutel
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from trainer.config import MoEConfig
from trainer.moe.layer import build_moe

TOKENS, DIM, MLP_RATIO, CAPACITY_FACTOR = 197, 384, 4.0, 1.25


@dataclass(frozen=True)
class Row:
    backend: str
    router: str
    experts: int
    top_k: int
    dense_ms: float
    moe_ms: float
    ratio: float
    note: str = ""


def _step(layer: nn.Module, x: Tensor, device: torch.device) -> float:
    """One forward + backward of ``layer``, in seconds."""
    # Start every step from empty grads, as a training loop with zero_grad(set_to_none=True)
    # does; otherwise later steps would also pay for accumulating into existing grads.
    layer.zero_grad(set_to_none=True)
    x.grad = None
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast:
        out = layer(x)
        loss = out.float().square().mean()
        aux = getattr(layer, "aux_loss", None)
        if aux is not None:
            loss = loss + aux
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _compare(dense: nn.Module, moe: nn.Module, x: Tensor, warmup: int, iters: int) -> tuple[float, float]:
    """Median ms per step of ``dense`` and ``moe``, measured alternately."""
    for _ in range(warmup):
        _step(dense, x, x.device)
        _step(moe, x, x.device)
    times: dict[str, list[float]] = {"dense": [], "moe": []}
    for i in range(iters):
        # Swap who goes first each iteration so cache warmth from the previous step is shared.
        order = [("dense", dense), ("moe", moe)] if i % 2 == 0 else [("moe", moe), ("dense", dense)]
        for name, layer in order:
            times[name].append(_step(layer, x, x.device))
    return statistics.median(times["dense"]) * 1e3, statistics.median(times["moe"]) * 1e3


def _cases(backends: list[str], experts: list[int], top_ks: list[int]) -> list[tuple[MoEConfig, str]]:
    """(config, note) per row: the linear-router grid, then Soft MoE and expert choice at 8 experts."""
    cases = [
        (
            MoEConfig(
                experts=e,
                top_k=k,
                mlp_ratio=MLP_RATIO,
                router="linear",
                capacity_factor=CAPACITY_FACTOR,
                backend=b,
            ),
            "",
        )
        for b in backends
        for e in experts
        for k in top_ks
        if k <= e
    ]
    if "native" in backends:
        # Tutel builds neither router, so these are native only.
        cases.append((MoEConfig(experts=8, top_k=1, mlp_ratio=MLP_RATIO, router="soft", slots_per_expert=1,
                                backend="native"),
                      f"vs k=1 dense; experts see 8 slots/image, not {TOKENS} tokens"))  # fmt: skip
        cases.append((MoEConfig(experts=8, top_k=1, mlp_ratio=MLP_RATIO, router="expert_choice",
                                capacity_factor=CAPACITY_FACTOR, backend="native"),
                      f"vs k=1 dense; each expert takes {CAPACITY_FACTOR}·T/E tokens"))  # fmt: skip
    return cases


def _tutel_problem(device: torch.device) -> str | None:
    """Why the tutel backend cannot be benchmarked here, or None if it can."""
    try:
        layer = build_moe(DIM, MoEConfig(experts=8, top_k=1, mlp_ratio=MLP_RATIO, backend="tutel")).to(device)
        _step(layer, torch.randn(2, TOKENS, DIM, device=device, requires_grad=True), device)
    except Exception as exc:  # noqa: BLE001 - the adapter is in flux; any failure means "skip it"
        return f"{type(exc).__name__}: {exc}"
    return None


def run(args: argparse.Namespace, log: Callable[[str], None]) -> list[Row]:
    device = torch.device(args.device)
    backends = list(args.backends)
    if "tutel" in backends and (problem := _tutel_problem(device)) is not None:
        log(f"tutel: skipped ({problem})")
        backends.remove("tutel")
    rows = []
    for cfg, note in _cases(backends, args.experts, args.top_k):
        # Reseed per row so a row's weights and input do not depend on which rows ran before it.
        torch.manual_seed(0)
        moe = build_moe(DIM, cfg).to(device)
        active_k = cfg.top_k if cfg.is_token_choice else 1
        dense = Mlp(DIM, hidden_features=int(active_k * MLP_RATIO * DIM)).to(device)
        x = torch.randn(args.batch, TOKENS, DIM, device=device, requires_grad=True)
        dense_ms, moe_ms = _compare(dense, moe, x, args.warmup, args.iters)
        row = Row(cfg.backend, cfg.router, cfg.experts, cfg.top_k, dense_ms, moe_ms, moe_ms / dense_ms, note)
        log(f"  {row.backend:6} {row.router:13} E={row.experts:<3} k={row.top_k}  "
            f"dense {dense_ms:8.1f} ms  moe {moe_ms:8.1f} ms  {row.ratio:.2f}x")  # fmt: skip
        rows.append(row)
    return rows


def _find(rows: list[Row], backend: str) -> Row | None:
    return next(
        (r for r in rows if (r.backend, r.router, r.experts, r.top_k) == (backend, "linear", 8, 1)), None
    )


def _print(rows: list[Row], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps([asdict(r) for r in rows], indent=2))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(Row.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    else:
        print("| backend | router | experts | top_k | dense ms | moe ms | MoE/dense | note |")
        print("|---|---|--:|--:|--:|--:|--:|---|")
        for r in rows:
            print(f"| {r.backend} | {r.router} | {r.experts} | {r.top_k} | {r.dense_ms:.1f} | {r.moe_ms:.1f} "
                  f"| {r.ratio:.2f}× | {r.note} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--iters", type=int, default=10, help="measured steps per layer (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per layer first (default 3)")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backends", nargs="+", choices=["native", "tutel"], default=["native", "tutel"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        # Progress goes to stderr so that stdout stays clean csv/json.
        print(message, file=sys.stderr, flush=True)

    start = time.perf_counter()
    log(f"batch {args.batch} x {TOKENS} tokens x {DIM} dims, {args.device}, "
        f"{torch.get_num_threads()} threads, {args.warmup} warmup + {args.iters} measured steps")  # fmt: skip
    rows = run(args, log)
    _print(rows, args.format)
    native, tutel = _find(rows, "native"), _find(rows, "tutel")
    if native is not None:
        print(f"native top-1 @ 8 experts: {native.ratio:.2f}× dense (target ≤ 1.3×)")
    if tutel is not None:
        native_vs_tutel = f"{native.moe_ms / tutel.moe_ms:.2f}" if native is not None else "n/a"
        print(f"tutel top-1 @ 8 experts: {tutel.ratio:.2f}× dense; native/tutel = {native_vs_tutel}")
    log(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
