"""benchmarks/sohl_dickstein.py: his training vectorised over the grid equals each grid point trained alone."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import sohl_dickstein as sd  # noqa: E402


@pytest.mark.parametrize("name", ["tanh", "relu", "minibatch"])
def test_vmap_lanes_equal_a_lane_trained_alone(name):
    problem = sd.make_problem(sd.CONFIGS[name], width=4)
    lrs = sd.grid_lrs(3, -1.0, 1.5)  # 9 lanes, some diverging
    together = sd.train_lanes(problem, lrs, steps=30)
    for k in range(lrs.shape[0]):
        alone = sd.train_lanes(problem, lrs[k:k + 1], steps=30)
        torch.testing.assert_close(together[k:k + 1], alone, rtol=1e-12, atol=0, equal_nan=True)
    mask = sd.converged(together)
    assert mask.any() and not mask.all()  # the grid straddles the boundary


def test_one_lane_follows_plain_gradient_descent_on_his_network():
    problem = sd.make_problem(sd.CONFIGS["tanh"], width=4)
    lr = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    w0, w1 = problem.w0.clone().requires_grad_(), problem.w1.clone().requires_grad_()
    expected = []
    for _ in range(5):
        loss = ((torch.tanh(problem.x @ w0 / 2 * 2**0.5) @ w1 / 2 / 2 - problem.y) ** 2).mean()
        expected.append(loss.item())
        g0, g1 = torch.autograd.grad(loss, (w0, w1))
        with torch.no_grad():
            w0 -= 0.3 * g0
            w1 -= 0.7 * g1
    torch.testing.assert_close(sd.train_lanes(problem, lr, steps=5)[0], torch.tensor(expected, dtype=torch.float64))


def test_his_divergence_rule():
    losses = torch.tensor([[2.0] + [1.0] * 25, [2.0] + [3.0] * 25, [2.0] + [float("nan")] * 25,
                           [2.0, float("inf")] + [1.0] * 24], dtype=torch.float64)
    assert sd.converged(losses).tolist() == [True, False, False, True]  # only the last 20 ratios count


def test_the_masks_it_writes_load_into_the_calibration(tmp_path):
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import fractal_calibration
    from shapes import disk_placed

    np.savez_compressed(tmp_path / "tanh.npz", mask_128=disk_placed(128, 0.8))
    rows = fractal_calibration.measure_masks(tmp_path)
    assert [(r["n"], r["split"]) for r in rows] == [(128, "reference"), (64, "subsampled"), (32, "subsampled")]
    assert all(r["family"] == "tanh:mask_128" and r["true"] == rows[0]["dimension"] for r in rows)
    assert abs(rows[0]["dimension"] - 1) < 0.02 and not rows[0]["too_small"] and rows[2]["too_small"]
    assert "tanh:mask_128" in fractal_calibration.masks_table(rows)
