"""The one-run canary audit's math (privacy/canary_audit.py), checked against scipy's binomial and closed forms."""
import json
import math

import numpy as np
import pytest
from scipy.stats import binom

from fedsynth.cli import _canary_verdict, build_parser
from fedsynth.config import RunConfig
from privacy.canary_audit import audit, binomial_tail, epsilon_lower_bound, guess_counts, p_value
from simulations.canaries import make_canaries, summary_lines


def rr_accuracy(eps):
    return math.exp(eps) / (math.exp(eps) + 1)


@pytest.mark.parametrize("r, v, eps", [(10, 8, 1.0), (100, 70, 0.5), (1000, 990, 3.0), (50, 50, 5.0), (7, 0, 2.0),
                                       (40, 41, 1.0)])
def test_binomial_tail_matches_scipy(r, v, eps):
    assert binomial_tail(r, eps, v) == pytest.approx(binom.sf(v - 1, r, rr_accuracy(eps)), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("m, r, v, eps, delta", [(100, 20, 17, 0.7, 1e-5), (1000, 200, 150, 1.5, 1e-4),
                                                 (50, 50, 50, 4.0, 1e-3)])
def test_p_value_with_delta_is_theorem_3(m, r, v, eps, delta):
    """f(v) + 2mδ · max_i (f(v−i) − f(v)) / i, with f from scipy."""
    q = rr_accuracy(eps)
    f = lambda u: binom.sf(u - 1, r, q)  # noqa: E731  P[W ≥ u]
    expected = f(v) + 2 * m * delta * max((f(v - i) - f(v)) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(min(1.0, expected), rel=1e-9)
    assert p_value(m, r, v, eps, 0.0) == pytest.approx(f(v), rel=1e-9)


def test_perfect_guesses_give_the_closed_form_maximum():
    # All r guesses right: P[Binomial(r, p) ≥ r] = p^r ≤ β  ⇔  p ≤ β^(1/r)
    #                     ⇔  ε ≤ log(p / (1 − p)) at p = β^(1/r)
    for r, beta in [(1, 0.5), (20, 0.05), (100, 0.01)]:
        p = beta ** (1 / r)
        assert epsilon_lower_bound(r, r, r, 0.0, beta) == pytest.approx(math.log(p / (1 - p)), abs=1e-9)
    # and nothing beats it: one wrong guess less can only lower the bound
    assert epsilon_lower_bound(20, 20, 19, 0.0) < epsilon_lower_bound(20, 20, 20, 0.0)


def test_bound_grows_with_correct_guesses_and_is_zero_at_chance():
    bounds = [epsilon_lower_bound(200, 100, v, 1e-5) for v in range(0, 101)]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
    assert bounds[50] == 0.0 and bounds[58] == 0.0  # 58/100 is within chance at 95%
    assert bounds[70] > 0 and bounds[90] > bounds[70]
    # the bound's own definition: p-value ≤ β at the bound, > β just above it
    b = bounds[80]
    assert p_value(200, 100, 80, b, 1e-5) <= 0.05 < p_value(200, 100, 80, b + 1e-3, 1e-5)


def test_delta_lowers_the_bound():
    assert epsilon_lower_bound(1000, 500, 500, 1e-4) < epsilon_lower_bound(1000, 500, 500, 0.0)


def test_guess_counts_by_hand():
    scores = [0.9, 0.1, 0.5, 0.8, 0.2, 0.3]
    included = [True, False, False, True, True, False]
    # top 2 (0.9, 0.8) guessed in: both right; bottom 2 (0.1, 0.2) guessed out: one right
    assert guess_counts(scores, included, 2, 2) == (4, 3)
    assert guess_counts(scores, included, 3, 0) == (3, 2)  # 0.9, 0.8 in; 0.5 wrongly in


def test_random_guesses_rarely_give_a_positive_bound():
    """Scores that know nothing of membership: a positive bound is a false alarm, at most β = 5% of the time."""
    rng = np.random.default_rng(7)
    trials, positive = 200, 0
    for _ in range(trials):
        included = rng.random(200) < 0.5
        positive += audit(rng.normal(size=200), included, delta=1e-5)["epsilon-lower-bound"] > 0
    assert positive / trials <= 0.10  # 5% expected (Bonferroni makes it less); 10% leaves room for chance


def test_non_private_mechanism_is_caught():
    """Scores that reveal membership exactly (a mechanism with no privacy at all) must give a bound well above a
    small ε: the audit has power."""
    included = np.random.default_rng(3).random(1000) < 0.5
    result = audit(included.astype(float), included, delta=1e-5)
    assert result["epsilon-lower-bound"] > 3.0
    assert result["best"]["correct"] >= 0.99 * result["best"]["guesses"]
    # a noisy but informative score still clears ε = 1
    noisy = included + np.random.default_rng(4).normal(scale=0.3, size=1000)
    assert audit(noisy, included, delta=1e-5)["epsilon-lower-bound"] > 1.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="equally long"):
        audit([1.0, 2.0], [True])
    with pytest.raises(ValueError, match="finite"):
        audit([1.0, float("nan")], [True, False])
    with pytest.raises(ValueError, match="correct"):
        p_value(10, 5, 6, 1.0)


def test_canaries_are_seeded_and_out_of_distribution():
    a, la, ia = make_canaries(64, 1, 28, seed=5)
    b, _, ib = make_canaries(64, 1, 28, seed=5)
    c, _, ic = make_canaries(64, 1, 28, seed=6)
    assert np.array_equal(a, b) and np.array_equal(ia, ib) and not np.array_equal(a, c)
    assert set(np.unique(a)) == {0.0, 1.0} and (la == 0).all() and 0.3 < a.mean() < 0.7
    assert 16 < ia.sum() < 48


def test_config_and_cli_flag():
    with pytest.raises(ValueError, match="audit-canaries must be an integer ≥ 0"):
        RunConfig(audit_canaries=-1)
    assert build_parser().parse_args(["simulate", "--audit-canaries", "12"]).audit_canaries == 12
    assert build_parser().parse_args(["simulate"]).audit_canaries == 0


def test_a_bound_above_the_accounted_epsilon_is_loud(tmp_path, capsys):
    result = {"site": "site-0", "canaries": 100, "included": 50, "epsilon-lower-bound": 2.5, "confidence": 0.95,
              "delta": 1e-5, "best": {"correct": 40, "guesses": 40, "k-in": 20, "k-out": 20},
              "epsilon-accounted-this-run": 1.0, "epsilon-accounted-ledger": 1.0, "exceeds-accounted": True}
    assert "WARNING" in summary_lines(result)[-1] and "EXCEEDS" in summary_lines(result)[-1]
    (tmp_path / "canary-audit.json").write_text(json.dumps(result))
    assert _canary_verdict(tmp_path) == 3
    assert "WARNING" in capsys.readouterr().err
    (tmp_path / "canary-audit.json").write_text(json.dumps(result | {"exceeds-accounted": False}))
    assert _canary_verdict(tmp_path) == 0


def test_canaries_join_a_patient_level_site_as_new_patients(tmp_path):
    from client.data import ImageDataset
    from simulations.canaries import plant_canaries, with_canaries

    run = RunConfig(run_id="p", state_dir=str(tmp_path), audit_canaries=10, seed=1)
    path = plant_canaries(run)
    with np.load(path) as z:
        n_in = int(z["included"].sum())
    images = np.zeros((4, 1, 28, 28), np.float32)
    for ids in (np.array([3, 3, 7, 7]), np.array(["a", "a", "b", "c"])):
        site = ImageDataset(images, np.array([0, 1, 0, 1]), ["x", "y"], "site", ids)
        grown = with_canaries(site, path)
        assert len(grown) == 4 + n_in and len(np.unique(grown.patient_ids)) == len(np.unique(ids)) + n_in
        assert (grown.labels[4:] == 0).all() and set(np.unique(grown.images[4:])) == {0.0, 1.0}


def _train_with_canaries(sigma: float, steps: int = 400, m: int = 128):
    """Real Opacus DP-SGD on 1000 bundled images plus the included canaries (one site, no federation); returns
    the audit of the trained VAE's canary scores and the (σ, q, steps) history the accountant recorded."""
    import torch

    from client.data import ImageDataset, load_dataset
    from client.trainer import cosine_lr, train_private
    from fedsynth.config import DEFAULT_DATA
    from models import build_generator
    from simulations.metrics import whitebox_mia_scores

    torch.set_num_threads(1)
    data = load_dataset(DEFAULT_DATA, "train")
    base = data.subset(np.sort(np.random.default_rng(0).choice(len(data), 1000, replace=False)))
    images, labels, included = make_canaries(m, 1, 28, seed=0)
    train = ImageDataset(np.concatenate([base.images, images[included]]),
                         np.concatenate([base.labels, labels[included]]), base.classes, "base + canaries")
    torch.manual_seed(0)
    model = build_generator("vae", num_classes=2, channels=1, resolution=28)
    result = train_private(model, train, sigma=sigma, clip=1.0, sample_rate=0.05, steps=steps,
                           lr=cosine_lr(2e-2, 5e-4, 0, steps), seed=0)
    return audit(whitebox_mia_scores(model, images, labels, seed=0), included, delta=1e-5), result.history


def test_real_dp_sgd_canaries_give_power_without_noise_and_stay_below_epsilon_with_it():
    """Measured here: σ = 0.05 (no privacy to speak of) → 64/64 guesses right, bound ≈ 2.36 (the most 128
    canaries can show); σ = 1.0 (ε ≈ 6.7 by PRV) → bound ≈ 0.27: the canaries and the score find real leakage,
    within ε."""
    from privacy.accountant import epsilon

    leaky, _ = _train_with_canaries(sigma=0.05)
    assert leaky["epsilon-lower-bound"] > 1.5
    private, history = _train_with_canaries(sigma=1.0)
    assert private["epsilon-lower-bound"] <= epsilon(history, 1e-5, "prv")
