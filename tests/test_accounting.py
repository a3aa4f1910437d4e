"""Accounting: epsilon equals dp-accounting on independently built events; calibration; errors."""
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from scipy import optimize, stats

from fedgen.privacy import accounting

Q, Z, T, DELTA = 0.05, 1.1, 60, 1e-5


def _independent(accountant_cls, event, relation, delta):
    acc = accountant_cls(neighboring_relation=relation)
    return acc.compose(event).get_epsilon(delta)


@pytest.mark.parametrize('name,cls', [('rdp', rdp.RdpAccountant), ('pld', pld.PLDAccountant)])
def test_poisson_epsilon_equals_dp_accounting(name, cls):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(Z)), T)
    want = _independent(cls, event, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, DELTA)
    assert accounting.epsilon(Q, Z, T, DELTA, name, 'poisson') == want
    assert 0 < want < math.inf


def test_fixed_epsilon_is_replace_one_without_replacement_at_half_z():
    n, m = 200, 10
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(Z / 2)),
        T)
    want = _independent(rdp.RdpAccountant, event, dp_accounting.NeighboringRelation.REPLACE_ONE,
                        DELTA)
    got = accounting.epsilon(m / n, Z, T, DELTA, 'rdp', 'fixed', num_clients=n)
    assert got == want
    # Replace-one doubles the sensitivity: fixed-size sampling costs more than Poisson at equal z.
    assert got > accounting.epsilon(m / n, Z, T, DELTA, 'rdp', 'poisson')


def _analytic_gaussian_epsilon(sigma, delta):
    """Balle & Wang (2018), Thm 8: the exact (eps, delta) curve of a sensitivity-1 Gaussian."""

    def gap(e):
        return (stats.norm.cdf(0.5 / sigma - e * sigma) -
                math.exp(e) * stats.norm.cdf(-0.5 / sigma - e * sigma) - delta)

    return optimize.brentq(gap, 0.0, 100.0, xtol=1e-12)


def test_full_participation_matches_analytic_gaussian():
    # q = 1: T rounds compose to one Gaussian with multiplier z / sqrt(T); PLD is tight, RDP not.
    z, steps = 2.0, 16
    exact = _analytic_gaussian_epsilon(z / math.sqrt(steps), DELTA)
    assert accounting.epsilon(1.0, z, steps, DELTA, 'pld') == pytest.approx(exact, rel=1e-4)
    assert accounting.epsilon(1.0, z, steps, DELTA, 'rdp') > exact


def test_round_accountant_running_epsilon():
    running = accounting.RoundAccountant(Q, Z, DELTA, 'rdp')
    assert running.epsilon_after(0) == 0.0
    for t in (1, 7, 30, 60):
        assert running.epsilon_after(t) == pytest.approx(accounting.epsilon(Q, Z, t, DELTA),
                                                         rel=1e-12)
    resumed = accounting.RoundAccountant(Q, Z, DELTA, 'pld')
    assert resumed.epsilon_after(T) == accounting.epsilon(Q, Z, T, DELTA, 'pld')
    with pytest.raises(ValueError, match='backwards'):
        resumed.epsilon_after(T - 1)
    assert accounting.RoundAccountant(Q, 0.0, DELTA).epsilon_after(3) == math.inf
    assert accounting.epsilon(Q, 0.0, 3, DELTA) == math.inf


def test_calibrate_noise_rdp():
    tol = 1e-3
    z = accounting.calibrate_noise(3.0, Q, T, DELTA, 'rdp', tol=tol)
    assert accounting.epsilon(Q, z, T, DELTA) <= 3.0
    assert accounting.epsilon(Q, z - 2 * tol, T, DELTA) > 3.0  # and it is (nearly) the smallest


def test_calibrate_noise_pld_full_participation():
    tol = 1e-3
    z = accounting.calibrate_noise(2.0, 1.0, 4, DELTA, 'pld', tol=tol)
    assert accounting.epsilon(1.0, z, 4, DELTA, 'pld') <= 2.0
    assert accounting.epsilon(1.0, z - 2 * tol, 4, DELTA, 'pld') > 2.0


def test_unreachable_target_is_one_line():
    # 1000 full-participation rounds at z = 1000 still spend ~0.11.
    with pytest.raises(ValueError, match=r'^dp\.target_epsilon=0.05 is unreachable') as err:
        accounting.calibrate_noise(0.05, 1.0, 1000, DELTA, 'rdp')
    assert '\n' not in str(err.value)
    with pytest.raises(ValueError, match=r'^fed\.dp\.target_epsilon'):
        accounting.calibrate_noise(0.0, Q, T, DELTA, section='fed.')


@pytest.mark.parametrize('kwargs,field', [
    (dict(delta=0.0), r'^dp\.delta'),
    (dict(delta=1.0), r'^dp\.delta'),
    (dict(accountant='moments'), r'^dp\.accountant'),
    (dict(sampling='shuffle'), r'^dp\.sampling'),
    (dict(sampling='fixed', accountant='pld', num_clients=100), r'^dp\.accountant'),
    (dict(sampling='fixed', num_clients=33), r'^dp\.sampling.*num_clients'),
    (dict(q=0.001, num_clients=100), 'expected count'),
    (dict(delta=0.01, num_clients=100), r'^dp\.delta'),
    (dict(delta=0.3, num_clients=4), r'^dp\.delta'),
])
def test_validation(kwargs, field):
    args = dict(q=Q, z=Z, steps=T, delta=DELTA, accountant='rdp', sampling='poisson', num_clients=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field) as err:
        accounting.epsilon(**args)
    assert '\n' not in str(err.value)
    with pytest.raises(ValueError, match=r'^fed\.dp\.noise_multiplier'):
        accounting.epsilon(Q, -1.0, T, DELTA, section='fed.')


def test_default_delta_is_below_one_over_n_and_delta_at_one_over_n_is_refused():
    for n in (2, 4, 100, 10**6):
        d = accounting.default_delta(n)
        assert d == pytest.approx(n**-1.1, rel=1e-15)
        assert d < 1 / n
        accounting.check(d, 'rdp', 'poisson', 1.0, n)  # the default passes
    with pytest.raises(ValueError, match=r'^dp\.delta must be in \(0, 1/N\)') as err:
        accounting.check(1 / 100, 'rdp', 'poisson', 0.1, 100)
    assert 'N = num_clients = 100' in str(err.value)
    with pytest.raises(ValueError, match=r'^fed\.dp\.delta .* N = fed\.num_clients = 100') as err:
        accounting.check(1 / 100, 'rdp', 'poisson', 0.1, 100, section='fed.')
    assert '\n' not in str(err.value) and '0.01' in str(err.value)
    with pytest.raises(ValueError, match=r'^fed\.dp\.delta'):
        accounting.RoundAccountant(0.1, 1.0, 0.02, 'rdp', 'poisson', 100, section='fed.')
    with pytest.raises(ValueError, match=r'^dp\.delta'):
        accounting.calibrate_noise(8.0, 0.1, 10, 0.5, 'rdp', 'poisson', 4)
    with pytest.raises(ValueError, match='DP needs num_clients >= 2'):
        accounting.default_delta(1)
    with pytest.raises(ValueError, match=r'DP needs fed\.num_clients >= 2'):
        accounting.default_delta(1, section='fed.')
    # Just under 1/N is allowed (the range is open at 1/N).
    assert accounting.epsilon(0.1, 1.0, 5, 0.999 / 100, 'rdp', 'poisson', 100) > 0


def _loss_pmf(q, sigma, direction, h, rounding):
    """pmf of the privacy loss of one Poisson-subsampled Gaussian round on the grid h Z.

    Add/remove-one, sensitivity 1, noise sigma: without the user the output is P = N(0, sigma^2),
    with it Q = (1 - q) N(0, sigma^2) + q N(1, sigma^2). 'remove' is L = log Q(x) / P(x) with
    x ~ Q, 'add' is L = log P(x) / Q(x) with x ~ P. L is monotone in x, so each of 4e5 x-cells
    (+-14 sigma: the mass outside is < 1e-40) has its loss between its edge values; rounding the
    cell's loss 'up' to the grid over-states every loss (an upper bound on delta(eps)), 'down'
    under-states it.
    """
    edges = np.linspace(-14 * sigma, 1 + 14 * sigma, 400_001)
    log_ratio = np.log1p(q * np.expm1((2 * edges - 1) / (2 * sigma**2)))  # log Q / P
    if direction == 'remove':
        cdf = (1 - q) * stats.norm.cdf(edges / sigma) + q * stats.norm.cdf((edges - 1) / sigma)
        lo, hi = log_ratio[:-1], log_ratio[1:]
    else:
        cdf = stats.norm.cdf(edges / sigma)
        lo, hi = -log_ratio[1:], -log_ratio[:-1]
    idx = np.ceil(hi / h) if rounding == 'up' else np.floor(lo / h)
    idx = idx.astype(np.int64)
    return np.bincount(idx - idx.min(), weights=np.diff(cdf)), int(idx.min())


def _composed_delta(pmf, offset, steps, h, eps):
    """delta(eps) = E[(1 - exp(eps - L_T))_+] of the sum L_T of T independent losses (FFT)."""
    n = (len(pmf) - 1) * steps + 1
    size = 1 << (n - 1).bit_length()
    dist = np.maximum(np.fft.irfft(np.fft.rfft(pmf, size)**steps, size)[:n], 0.0)
    loss = (np.arange(n) + offset * steps) * h
    tail = loss > eps
    return float(np.sum(dist[tail] * -np.expm1(eps - loss[tail])))


def test_poisson_epsilon_matches_a_privacy_loss_computed_from_first_principles():
    # The docs claim: Poisson sampling is accounted under add/remove-one. Here the T-fold privacy
    # loss distribution of that relation is built from the two Gaussian mixtures directly (no
    # dp-accounting event), for both directions, and delta(eps) is their maximum.
    q, z, steps, delta, h = 0.2, 1.0, 10, 1e-5, 2e-4
    bounds = []
    for rounding in ('down', 'up'):
        pmfs = [_loss_pmf(q, z, d, h, rounding) for d in ('remove', 'add')]

        def gap(eps):
            return max(_composed_delta(p, o, steps, h, eps) for p, o in pmfs) - delta

        bounds.append(optimize.brentq(gap, 0.01, 20.0, xtol=1e-7))
    lo, hi = bounds
    assert 0 < hi - lo < 5e-3  # the grid brackets the true epsilon tightly
    # dp-accounting's PLD rounds each round's loss up to a 1e-4 grid (pessimistic), so its
    # epsilon may exceed the true one by at most T * 1e-4 = 1e-3.
    got = accounting.epsilon(q, z, steps, delta, 'pld', 'poisson')
    assert lo <= got <= hi + steps * 1e-4, (lo, got, hi)
    assert accounting.RoundAccountant(q, z, delta, 'pld').epsilon_after(steps) == got
    # RDP is an upper bound, never below the true epsilon.
    assert accounting.epsilon(q, z, steps, delta, 'rdp', 'poisson') >= lo
    # Replace-one (sensitivity 2 S) at the same z would need twice the noise: a relation mix-up
    # moves epsilon far outside the bracket.
    assert accounting.epsilon(q, z / 2, steps, delta, 'pld', 'poisson') > 2 * hi


def test_fixed_epsilon_is_replace_one_from_first_principles():
    # Fixed-size sampling with m = N (q = 1): every round is the Gaussian mechanism on a sum whose
    # replace-one sensitivity is 2 S, with noise std z S. Its Renyi divergence at order a is
    # a (2 S)^2 / (2 (z S)^2) = 2 a / z^2 (Mironov 2017), T rounds add up, and the conversion
    # eps = T rdp(a) + log(1 - 1/a) - log(delta a) / (a - 1) (Canonne, Kamath, Steinke 2020)
    # is minimised over a fine grid of orders; the accountant minimises over fewer orders.
    z, steps, delta, n = 3.0, 20, 1e-5, 50
    orders = np.linspace(1.02, 200.0, 200_000)
    want = np.min(steps * 2 * orders / z**2 + np.log1p(-1 / orders) - np.log(delta * orders) /
                  (orders - 1))
    got = accounting.epsilon(1.0, z, steps, delta, 'rdp', 'fixed', num_clients=n)
    assert want <= got <= want * 1.01, (want, got)
    assert accounting.RoundAccountant(1.0, z, delta, 'rdp', 'fixed', n).epsilon_after(steps) == got
    # Add/remove (sensitivity S) would give rdp a / (2 z^2): far smaller, so the factor 2 shows.
    add_remove = np.min(steps * orders / (2 * z**2) + np.log1p(-1 / orders) -
                        np.log(delta * orders) / (orders - 1))
    assert got > 1.5 * add_remove
