"""Tests for fedgen.algorithms.optim: FedAdagrad/FedYogi/FedAdam (Reddi et al. 2021, Alg. 2)."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedgen.algorithms import optim

LR, B1, B2, TAU = 0.1, 0.9, 0.99, 1e-2
X0 = {'a': np.array([0.5, -1.0, 2.0, 0.0], np.float32), 'b': np.array([[1.5, -0.25]], np.float32)}
# Aggregated client updates Delta_t of two rounds. Entries with |Delta| < tau make Yogi's
# sign(v - Delta^2) positive in round 1 (v_{-1} = tau^2), the others negative; a sign change
# between rounds and a zero update are included.
DELTAS = [
    {
        'a': np.array([0.3, -0.2, 0.005, 0.0], np.float32),
        'b': np.array([[1e-3, -0.4]], np.float32)
    },
    {
        'a': np.array([-0.1, -0.2, 0.05, 0.02], np.float32),
        'b': np.array([[2e-3, 0.4]], np.float32)
    },
]


def _by_hand(name, x, deltas):
    """Scalar loops over Algorithm 2 of the paper, in float64."""
    x = np.asarray(x, np.float64).ravel().copy()
    m, v = np.zeros_like(x), np.full_like(x, TAU**2)
    for delta in deltas:
        d = np.asarray(delta, np.float64).ravel()
        for i in range(x.size):
            m[i] = B1 * m[i] + (1 - B1) * d[i]
            if name == 'fedadagrad':
                v[i] = v[i] + d[i]**2
            elif name == 'fedyogi':
                v[i] = v[i] - (1 - B2) * d[i]**2 * np.sign(v[i] - d[i]**2)
            else:
                v[i] = B2 * v[i] + (1 - B2) * d[i]**2
            x[i] = x[i] + LR * m[i] / (np.sqrt(v[i]) + TAU)
    return x


def _run(tx, deltas):
    """What the engine does: g = -Delta into the optimizer, updates added to the weights."""
    params = {k: jnp.asarray(v) for k, v in X0.items()}
    state = tx.init(params)
    for delta in deltas:
        grads = {k: -jnp.asarray(v) for k, v in delta.items()}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize('name', optim.FEDOPT)
def test_two_rounds_match_hand_computation(name):
    tx = optim.build_server(optim.ServerOptSpec(name, LR, B1, B2, TAU))
    for rounds in (1, 2):
        got = _run(tx, DELTAS[:rounds])
        for key in X0:
            want = _by_hand(name, X0[key], [d[key] for d in DELTAS[:rounds]])
            np.testing.assert_allclose(np.ravel(got[key]), want, rtol=1e-6, atol=1e-7)


def test_the_three_differ_and_first_step_is_not_bias_corrected():
    outs = {
        n: _run(optim.build_server(optim.ServerOptSpec(n, LR, B1, B2, TAU)), DELTAS)
        for n in optim.FEDOPT
    }
    for p, q in ((0, 1), (0, 2), (1, 2)):  # apart by far more than the 1e-6 tolerance above
        a, b = outs[optim.FEDOPT[p]]['a'], outs[optim.FEDOPT[q]]['a']
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
    # FedAdam's first step on a large coordinate: lr (1-b1) D / (sqrt(b2 tau^2 + (1-b2) D^2) +
    # tau) = 0.1 * 0.03 / (0.0302 + 0.01) ~ 0.075, whereas bias-corrected Adam steps ~lr = 0.1.
    one = _run(optim.build_server(optim.ServerOptSpec('fedadam', LR, B1, B2, TAU)), DELTAS[:1])
    step = float(one['a'][0] - X0['a'][0])
    d = 0.3
    assert step == pytest.approx(LR * (1 - B1) * d / (np.sqrt(B2 * TAU**2 + (1 - B2) * d**2) + TAU),
                                 rel=1e-5)
    adam = _run(optax.adam(LR, b1=B1, b2=B2, eps=TAU), DELTAS[:1])
    assert abs(float(adam['a'][0] - X0['a'][0]) - step) > 0.02


def test_state_starts_at_tau_squared_and_zero_momentum():
    tx = optim.build_server(optim.ServerOptSpec('fedyogi', LR, B1, B2, TAU))
    state = tx.init({k: jnp.asarray(v) for k, v in X0.items()})
    np.testing.assert_array_equal(np.asarray(state.m['a']), 0.0)
    np.testing.assert_allclose(np.asarray(state.v['b']), TAU**2, rtol=1e-6)


def test_sgd_at_lr_one_is_fedavg_and_momentum_is_fedavgm():
    out = _run(optim.build_server(optim.ServerOptSpec('sgd', 1.0)), DELTAS)
    np.testing.assert_allclose(np.asarray(out['a']),
                               X0['a'] + DELTAS[0]['a'] + DELTAS[1]['a'],
                               rtol=1e-6)
    # FedAvgM: u_t = beta u_{t-1} + Delta_t, x <- x + lr u_t.
    out = _run(optim.build_server(optim.ServerOptSpec('momentum', 0.5, b1=0.8)), DELTAS)
    u1 = DELTAS[0]['a']
    u2 = 0.8 * u1 + DELTAS[1]['a']
    np.testing.assert_allclose(np.asarray(out['a']), X0['a'] + 0.5 * (u1 + u2), rtol=1e-6)


def test_legacy_build_names_give_the_paper_methods():
    d = optim.ServerOptSpec()
    for name in optim.FEDOPT:
        got = _run(optim.build(name, LR, 'fed.server_opt', 'fed.server_lr'), DELTAS)
        want = _run(optim.build_server(optim.ServerOptSpec(name, LR, d.b1, d.b2, d.tau)), DELTAS)
        np.testing.assert_array_equal(np.asarray(got['a']), np.asarray(want['a']))
    with pytest.raises(ValueError, match='client_opt'):
        optim.build('yogi', 0.1, 'fed.client_opt', 'fed.client_lr')
    with pytest.raises(ValueError, match='client_lr'):
        optim.build('sgd', 0.0, 'fed.client_opt', 'fed.client_lr')


@pytest.mark.parametrize('spec, field', [
    (optim.ServerOptSpec('adagrad'), 'fed.server_opt'),
    (optim.ServerOptSpec('fedadam', lr=0.0), 'fed.server_lr'),
    (optim.ServerOptSpec('fedadam', b1=1.0), 'fed.server_b1'),
    (optim.ServerOptSpec('fedyogi', b2=-0.1), 'fed.server_b2'),
    (optim.ServerOptSpec('fedadagrad', tau=0.0), 'fed.server_tau'),
    (optim.ServerOptSpec('fedadam', tau='1e-3'), 'fed.server_tau'),
])
def test_bad_specs_raise_naming_the_field(spec, field):
    """The library names its own server_* parameters; the translator's field prefix fed.server
    gives the config's names."""
    with pytest.raises(ValueError, match=f'^{field.replace("fed.", "")} must be'):
        optim.build_server(spec)
    with pytest.raises(ValueError, match=f'^{field} must be') as err:
        optim.build_server(spec, 'fed.server')
    assert '\n' not in str(err.value)
