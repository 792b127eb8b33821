"""Training step time of each objective at equal settings (forward + backward + AdamW step), interleaved.

ViT-tiny (12 blocks, width 192) at the paper table's shape (image 32, patch 4 -> 64 patches, K=50), batch 64,
random images and tokens (the cost does not depend on the values). Rounds alternate between the objectives so
machine load hits them alike; the median over rounds is reported with the ratio to ``--baseline``. MaPeT runs
its two streams as one sequence of N + 2 (N - c) tokens (c = 19 of 64 by default), BEiT one of N.

    .venv/bin/python benchmarks/objective_step.py [--objectives beit,mapet,kmim,mae] [--rounds 7] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import emit, machine

from kmim.trainer.objectives import build_objective


def step_fn(name: str, batch: int, image: int, patch: int, k: int):
    """One optimizer step of objective ``name`` on a fixed random batch, as a closure."""
    torch.manual_seed(0)
    model = build_objective(name, "tiny", image, patch, k=k, amp=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, image, image)
    tokens = torch.randint(0, k, (batch, image // patch, image // patch))
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        loss = model(images, tokens, generator=gen)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objectives", default="beit,mapet,kmim,mae")
    ap.add_argument("--baseline", default="beit")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per objective per round")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    steps = {name: step_fn(name, args.batch, 32, 4, 50) for name in args.objectives.split(",")}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t) / args.steps)
    base = statistics.median(times[args.baseline])
    for name, ts in times.items():
        med = statistics.median(ts)
        emit(bench="objective_step", objective=name, batch=args.batch, s_per_step=round(med, 4),
             ratio_to_baseline=round(med / base, 3), baseline=args.baseline, load=os.getloadavg()[0],
             machine=machine())


if __name__ == "__main__":
    main()
