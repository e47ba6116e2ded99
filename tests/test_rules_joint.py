"""rules DIR1 DIR2 ...: LR_crit = a D^b P^c across studies of different model sizes, on synthetic studies whose edge
follows a known law in both (no training)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import cli, ok
from test_rules import build_study

from vmap_sweep.analysis.rules import rules_of_thumb
from vmap_sweep.analysis.rules_joint import fit_joint, joint_rules
from vmap_sweep.analysis.view import StudyView
from vmap_sweep.errors import ConfigError
from vmap_sweep.present.prose import joint_rules_sentences

PARAMS = (1e6, 1e7, 1e8)


def crit(p: float):
    """LR_crit(D, P) = 3e-5 (D/1e3)^0.5 (P/1e6)^-0.3."""
    return lambda d: 3e-5 * (d / 1e3) ** 0.5 * (p / 1e6) ** -0.3


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    for p in PARAMS:
        build_study(root / f"p{p:.0e}", crit(p), nx=48, ny=8).close()
    return [root / f"p{p:.0e}" for p in PARAMS]


def test_exact_joint_law_is_recovered_by_the_fit():
    d, p = np.meshgrid([1e3, 1e4, 1e5], PARAMS)
    lr = 2e-4 * d**0.4 * p**-0.25
    f = fit_joint(d.ravel(), p.ravel(), lr.ravel())
    assert f.size_exponent.value == pytest.approx(0.4) and f.params_exponent.value == pytest.approx(-0.25)
    assert f.coefficient == pytest.approx(2e-4) and f.r2 == pytest.approx(1.0) and f.n == 9
    # each model at its own dataset size only: D and P move together, no fit
    assert fit_joint(np.array([1e3, 1e4, 1e5, 1e6]), np.array([1e6, 1e7, 1e8, 1e9]), np.ones(4)) is None


def test_joint_fit_recovers_both_exponents_from_studies(studies):
    r = joint_rules([rules_of_thumb(StudyView.load(s)) for s in studies], list(PARAMS))
    b, c = r.fit.size_exponent, r.fit.params_exponent
    # grid quantisation (48 LRs over 5 decades) biases each edge by up to one LR step
    assert abs(b.value - 0.5) < 0.05 and abs(c.value + 0.3) < 0.05 and r.fit.n == 24
    assert b.ci_low < b.value < b.ci_high and c.ci_low < c.value < c.ci_high and c.ci_high < 0
    assert r.fit.predict(1e4, 1e7) == pytest.approx(crit(1e7)(1e4), rel=0.3)
    for s, p in zip(r.studies, PARAMS, strict=True):
        assert s.params == p and len(s.sizes) == 8 and abs(s.own_fit.exponent - 0.5) < 0.05
    sentence = joint_rules_sentences(r)[1]
    assert f"model-size exponent c = {c.value:.3f}, 95% CI [{c.ci_low:.3f}, {c.ci_high:.3f}]" in sentence
    assert f"multiplies LR_crit by {10 ** c.value:.3g}" in sentence


def test_studies_that_cannot_be_fitted_together_are_refused(studies, tmp_path):
    rs = [rules_of_thumb(StudyView.load(s)) for s in studies]
    with pytest.raises(ConfigError, match="at least two model sizes"):
        joint_rules(rs, [1e6, 1e6, 1e6])
    with pytest.raises(ConfigError, match="one per study"):
        joint_rules(rs, [1e6, 1e7])
    with build_study(tmp_path / "m", crit(1e6), x="tokens:1e3:1e6:log", y="matrix_lr:1e-6:1e-1:log", nx=8,
                     ny=48) as other:
        with pytest.raises(ConfigError, match="different LR axes") as e:
            joint_rules([rs[0], rules_of_thumb(StudyView.load(other))], [1e6, 1e7])
    assert "\n" not in str(e.value)


def test_cli_joint_rules_json_plot_and_one_line_errors(studies, tmp_path):
    args = ["rules", *studies, "--params", ",".join(str(p) for p in PARAMS)]
    d = json.loads(ok(*args, "--json").stdout)
    assert abs(d["fit"]["params_exponent"]["value"] + 0.3) < 0.05 and len(d["studies"]) == 3
    out = ok(*args, "--plot", tmp_path / "joint.png").stdout
    assert "Joint fit over 3 studies, 24 points" in out and (tmp_path / "joint.png").stat().st_size > 10_000
    same = cli("rules", *studies)  # all three are the tiny model: counted, one size
    assert same.exit_code == 2 and "at least two model sizes" in same.stderr
    assert len(same.stderr.strip().splitlines()) == 1
    bad = cli("rules", *studies, "--params", "1e6,x,3")
    assert bad.exit_code == 2 and "--params" in bad.stderr
