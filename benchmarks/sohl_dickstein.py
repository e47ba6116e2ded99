"""Sohl-Dickstein's trainability boundary, reproduced: his network, data, grid and divergence rule, trained with
torch.func over the grid of the two layers' learning rates; each mask measured with our estimator.

    PYTHONPATH=. python benchmarks/sohl_dickstein.py --device cpu --resolutions 64 --out /tmp/sd   # CPU check
    PYTHONPATH=. python benchmarks/sohl_dickstein.py --device cuda --resolutions 256 512 1024 2048 --out $OUT

Source: github.com/Sohl-Dickstein/fractal, the_boundary_of_neural_network_trainability_is_fractal.ipynb (the
paper is arXiv:2402.06184). What it does, and what this script copies:
- network: ``depth`` = 2 fully connected layers of width 16 (the paper's; the notebook's default is 8), mean-field
  parameterisation: z = x W / sqrt(fan_in) at every layer, hidden activation tanh(sqrt(2) z) (ReLU: sqrt(2)
  relu(z); identity: z), output the last z / sqrt(fan_in); weights N(0, 1); no biases.
- data: as many points as free parameters (16 * 16 + 16 = 272; "dataset_param_multiple" 1), inputs and targets
  N(0, 1), target dimension 1; loss the mean squared error. "single" trains on 1 point.
- training: ``steps`` full-batch gradient descent steps (the paper used 500 or 1000; the notebook's default is
  100), each layer with its own learning rate; "minibatch" takes the gradient on 16 points drawn with replacement
  each step (the same draw for every grid point) and records the full-batch loss.
- grid: log10 of the input layer's learning rate along x (columns) and of the output layer's along y (rows),
  each ``logspace(-3, 6, n)`` (his starting view, [-3, 6] x [-3, 6]); float64 throughout, as his jax_enable_x64.
- divergence rule (his convergence_measure): v = losses / first loss, non-finite -> 1e6, clipped at 1e6;
  converged iff the mean of the last 20 is below 1. The mask is True where converged.
What differs: his random draws come from jax's PRNG, ours from torch's (same distributions, other numbers), so a
mask is another instance of his configuration, not his image; his dimension is the median local box-count slope
(porespy) over the frames of a zoom sequence at 4096^2 deep inside the boundary, ours the box-counting estimate of
vmap_sweep.analysis.fractal over his full starting view. The configuration "paraminit_vs_lr" is not reproduced.

Writes under --out: ``<config>.npz`` (bool masks ``mask_<n>``, compressed; one file per configuration, at most 6)
and ``results.json`` (one row per configuration and resolution); benchmarks/fractal_calibration.py --masks OUT
reads the masks as held-out cases.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import grad_and_value, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmap_sweep.analysis.fractal import fractal_dimension  # noqa: E402
from vmap_sweep.errors import ConfigError  # noqa: E402

RATIO_CAP = 1e6  # his max_val
LAST = 20  # his mean over the last 20 ratios
LR_RANGE = (-3.0, 6.0)  # log10 learning rate of both layers, his starting view


@dataclass(frozen=True)
class Config:
    name: str
    nonlinearity: str  # tanh, relu, identity
    points: int | None  # None: as many as free parameters (272 at width 16)
    minibatch: int | None  # None: full batch
    published: float | None  # his dimension for this configuration
    published_note: str


# His reported dimensions, as recalled from arXiv:2402.06184 (Fig. 1) and NOT checked against the paper here: a
# summary of the paper gives the range 1.17-1.98 over its configurations, which fixes only its two ends.
CONFIGS = {
    "tanh": Config("tanh", "tanh", None, None, 1.66, "recalled, unverified"),
    "relu": Config("relu", "relu", None, None, 1.55, "recalled, unverified"),
    "identity": Config("identity", "identity", None, None, 1.17, "lowest of the paper's range"),
    "minibatch": Config("minibatch", "tanh", None, 16, 1.98, "highest of the paper's range"),
    "single": Config("single", "tanh", 1, None, 1.41, "recalled, unverified"),
}


@dataclass(frozen=True)
class Problem:
    """His initial weights (w0: width x width, w1: width x 1) and data (x: points x width, y: points x 1)."""

    w0: torch.Tensor
    w1: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    nonlinearity: str
    minibatch: int | None


def make_problem(config: Config, width: int = 16, seed: int = 0, device: str = "cpu",
                 dtype: torch.dtype = torch.float64) -> Problem:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(width, width, generator=g, dtype=dtype)
    w1 = torch.randn(width, 1, generator=g, dtype=dtype)
    points = config.points if config.points is not None else width * width + width  # params / target_dim
    x = torch.randn(points, width, generator=g, dtype=dtype)
    y = torch.randn(points, 1, generator=g, dtype=dtype)
    return Problem(*(t.to(device) for t in (w0, w1, x, y)), config.nonlinearity, config.minibatch)


def net(w0: torch.Tensor, w1: torch.Tensor, x: torch.Tensor, nonlinearity: str) -> torch.Tensor:
    z = x @ w0 / math.sqrt(w0.shape[0])
    if nonlinearity == "tanh":
        h = torch.tanh(z * math.sqrt(2.0))
    elif nonlinearity == "relu":
        h = torch.relu(z) * math.sqrt(2.0)
    else:
        h = z
    z = h @ w1 / math.sqrt(w1.shape[0])
    return z / math.sqrt(w1.shape[0])


def _loss(params: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor, nonlinearity: str):
    return ((net(params[0], params[1], x, nonlinearity) - y) ** 2).mean()


def train_lanes(problem: Problem, lr: torch.Tensor, steps: int, seed: int = 42) -> torch.Tensor:
    """Gradient descent on ``lr.shape[0]`` copies at once (vmap over the lanes), lane k with layer learning rates
    ``lr[k] = (input layer, output layer)``; returns the (lanes, steps) losses before each step, full batch."""
    k = lr.shape[0]
    w0 = problem.w0.expand(k, -1, -1).clone()
    w1 = problem.w1.expand(k, -1, -1).clone()
    nl = problem.nonlinearity
    step = vmap(grad_and_value(lambda p, x, y: _loss(p, x, y, nl)), in_dims=((0, 0), None, None))
    full = vmap(lambda p: _loss(p, problem.x, problem.y, nl), in_dims=((0, 0),))
    g = torch.Generator(device="cpu").manual_seed(seed)
    losses = torch.empty(k, steps, dtype=problem.x.dtype, device=problem.x.device)
    lr0, lr1 = lr[:, 0, None, None], lr[:, 1, None, None]
    for t in range(steps):
        if problem.minibatch is None:
            (g0, g1), loss = step((w0, w1), problem.x, problem.y)
        else:
            idx = torch.randint(0, problem.x.shape[0], (problem.minibatch,), generator=g).to(problem.x.device)
            (g0, g1), _ = step((w0, w1), problem.x[idx], problem.y[idx])
            loss = full((w0, w1))
        losses[:, t] = loss
        w0 = w0 - lr0 * g0
        w1 = w1 - lr1 * g1
    return losses


def converged(losses: torch.Tensor) -> torch.Tensor:
    """His convergence_measure's sign: True where the mean of the last 20 loss ratios is below 1."""
    v = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, RATIO_CAP))
    v = v / v[:, :1]
    v = torch.where(v > RATIO_CAP, torch.full_like(v, RATIO_CAP), v)
    v = torch.nan_to_num(v, nan=RATIO_CAP)  # a first loss of inf gives inf / inf
    return v[:, -LAST:].mean(dim=1) < 1


def grid_lrs(n: int, lo: float = LR_RANGE[0], hi: float = LR_RANGE[1]) -> torch.Tensor:
    """(n*n, 2) learning rates, row-major: row i = output layer lr 10^(lo..hi)[i], column j = input layer's."""
    g = torch.logspace(lo, hi, n, dtype=torch.float64)
    out_lr, in_lr = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([in_lr.reshape(-1), out_lr.reshape(-1)], dim=1)


def mask(problem: Problem, n: int, steps: int, chunk: int,
         window: tuple[float, float, float, float] = LR_RANGE * 2) -> np.ndarray:
    """(n, n) bool trainability mask over his grid (``window``: log10 lr of the input layer from, to, then of the
    output layer's), trained ``chunk`` lanes at a time (bounded memory)."""
    g_in = torch.logspace(window[0], window[1], n, dtype=torch.float64)
    g_out = torch.logspace(window[2], window[3], n, dtype=torch.float64)
    out_lr, in_lr = torch.meshgrid(g_out, g_in, indexing="ij")
    lrs = torch.stack([in_lr.reshape(-1), out_lr.reshape(-1)], dim=1).to(device=problem.x.device,
                                                                         dtype=problem.x.dtype)
    out = torch.empty(n * n, dtype=torch.bool, device=problem.x.device)
    for start in range(0, n * n, chunk):
        out[start:start + chunk] = converged(train_lanes(problem, lrs[start:start + chunk], steps))
    return out.reshape(n, n).cpu().numpy()


def measure(m: np.ndarray) -> dict:
    if m.all() or not m.any():
        return {"dimension": None, "note": "one class only"}
    r = fractal_dimension(m)
    return {"dimension": r.dimension, "ci_low": r.ci_low, "ci_high": r.ci_high, "octaves": r.octaves,
            "fit_range": list(r.fit_range), "local_slopes": list(r.local_slope_range),
            "too_small": r.too_small, "converged_share": float(m.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolutions", nargs="*", type=int, default=[64])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=sorted(CONFIGS),
                        help="in this order; --budget-s skips what would not fit")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--chunk", type=int, default=None, help="lanes per vmap call (default: 2^16 GPU, 2^12 CPU)")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--budget-s", type=float, default=290.0,
                        help="skip a (configuration, resolution) whose projected training time (from the cost per "
                             "pixel measured so far) would overrun this many seconds in all")
    parser.add_argument("--window", nargs=4, type=float, default=list(LR_RANGE * 2),
                        metavar=("IN_LO", "IN_HI", "OUT_LO", "OUT_HI"),
                        help="log10 learning rates of the input layer (x) and the output layer (y); default his "
                             "starting view -3 6 -3 6")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not (args.window[0] < args.window[1] and args.window[2] < args.window[3]):
        raise SystemExit(f"--window {args.window}: each axis needs from < to")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; pass --device cpu")
    if any(n < 4 for n in args.resolutions):
        raise SystemExit(f"--resolutions {args.resolutions}: every resolution needs 4 or more points a side")
    chunk = args.chunk or (2**16 if args.device.startswith("cuda") else 2**12)  # 2^16 fp64 lanes: ~20 GB
    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    spent, per_pixel = 0.0, None  # seconds trained so far; the latest measured cost of one pixel
    for name in args.configs:
        config = CONFIGS[name]
        problem = make_problem(config, device=args.device, dtype=dtype)
        masks = {}
        for n in sorted(args.resolutions):
            if per_pixel is not None and spent + per_pixel * n * n > args.budget_s:
                print(f"{name:<10} {n:>5}^2 skipped: projected {per_pixel * n * n:.0f} s at {1e6 * per_pixel:.1f} "
                      f"us/pixel would overrun --budget-s {args.budget_s:.0f} ({spent:.0f} s spent)", flush=True)
                continue
            t0 = time.perf_counter()
            m = mask(problem, n, args.steps, chunk, tuple(args.window))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            spent += seconds
            if n >= 64:  # smaller grids are dominated by per-step overhead, not a cost per pixel
                per_pixel = seconds / n**2
            masks[f"mask_{n}"] = m
            try:
                row = measure(m)
            except ConfigError as e:
                row = {"dimension": None, "note": str(e)}
            row.update(config=name, n=n, window=list(args.window),
                       steps=args.steps, seconds=seconds, us_per_pixel=1e6 * seconds / n**2,
                       published=config.published, published_note=config.published_note, device=args.device,
                       dtype=args.dtype)
            rows.append(row)
            d = row.get("dimension")
            shown = "no number" if d is None else f"{d:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
            if row.get("too_small"):
                shown += " (too small a map: `fractal` would print no number)"
            print(f"{name:<10} {n:>5}^2 D = {shown}, {row.get('octaves', math.nan):.1f} octaves; published "
                  f"{config.published} ({config.published_note}); {seconds:.1f} s, "
                  f"{row['us_per_pixel']:.1f} us/pixel", flush=True)
        if masks:
            np.savez_compressed(args.out / f"{name}.npz", **masks)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
