"""Accounting: epsilon equals dp-accounting on independently built events; calibration; errors."""
import math

import dp_accounting
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
    with pytest.raises(ValueError, match=r'fed.dp.target_epsilon=0.05 is unreachable') as err:
        accounting.calibrate_noise(0.05, 1.0, 1000, DELTA, 'rdp')
    assert '\n' not in str(err.value)
    with pytest.raises(ValueError, match='fed.dp.target_epsilon'):
        accounting.calibrate_noise(0.0, Q, T, DELTA)


@pytest.mark.parametrize('kwargs,field', [
    (dict(delta=0.0), 'fed.dp.delta'),
    (dict(delta=1.0), 'fed.dp.delta'),
    (dict(accountant='moments'), 'fed.dp.accountant'),
    (dict(sampling='shuffle'), 'fed.dp.sampling'),
    (dict(sampling='fixed', accountant='pld', num_clients=100), 'fed.dp.accountant'),
    (dict(sampling='fixed', num_clients=33), 'fed.dp.sampling'),
    (dict(q=0.001, num_clients=100), 'expected count'),
])
def test_validation(kwargs, field):
    args = dict(q=Q, z=Z, steps=T, delta=DELTA, accountant='rdp', sampling='poisson', num_clients=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field) as err:
        accounting.epsilon(**args)
    assert '\n' not in str(err.value)
    with pytest.raises(ValueError, match='fed.dp.noise_multiplier'):
        accounting.epsilon(Q, -1.0, T, DELTA)
