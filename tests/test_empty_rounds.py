"""A round with no sampled or no surviving client (K_t = 0) is a valid round: without DP the global
model and the server optimizer's state are kept and the row says clients_used 0; under DP it is a
noise-only, accounted update. A Poisson DP run that samples nobody finishes instead of stopping."""
import json
import os

import chex
import jax
import numpy as np
import optax

from configs import ptb_fedgen_edge
from experiments import train
from experiments import translate
from fedgen import aggregators, algorithms
from fedgen.algorithms import optim
from fedgen.data import batching
from fedgen.privacy import dp as dp_lib
from fedgen.privacy import sampling

LORA = algorithms.LoraSpec(2, 16.0, ('attn', ))


def _build(tiny, **kw):
    p = algorithms.MethodParams('fedgen_edge', 6, optax.adam(1e-2), kw.pop('server_tx'), LORA, **kw)
    frozen, trainable = algorithms.variables(p, tiny.params, jax.random.PRNGKey(1))
    alg = algorithms.make(p, tiny.loss_fn)
    return alg, frozen, alg.init(trainable, jax.random.PRNGKey(2))


def _nobody(tiny):
    data = tiny.round_data([0, 1, 2, 4], 0)
    return batching.drop_absent(data, np.zeros(4, np.float32))


def test_no_client_keeps_the_model_and_the_server_optimizer(tiny):
    fedadam = optim.build_server(optim.ServerOptSpec('fedadam', 0.1))
    alg, frozen, state = _build(tiny, server_tx=fedadam)
    moved, _ = jax.jit(alg.apply)(state, frozen, tiny.round_data([0, 1], 0))
    new, m = jax.jit(alg.apply)(moved, frozen, _nobody(tiny))
    assert int(new.round) == 2 and float(m['clients_used']) == 0
    assert float(m['clients_sampled']) == 0 and np.isfinite(float(m['train_loss']))
    # FedAdam would still move on a zero pseudo-gradient (its momentum); the round keeps it all.
    chex.assert_trees_all_equal(new.trainable, moved.trainable)
    chex.assert_trees_all_equal(new.opt_state, moved.opt_state)


def test_no_client_under_dp_is_a_noise_only_update(tiny):
    params = dp_lib.make_params(0.1, 1.0, 4)
    alg, frozen, state = _build(tiny,
                                server_tx=optax.sgd(1.0),
                                aggregator=aggregators.dp_mean(params))
    new, _ = jax.jit(alg.apply)(state, frozen, _nobody(tiny))
    moved = jax.tree.map(lambda a, b: np.asarray(a - b), new.trainable, state.trainable)
    leaves = np.concatenate([x.ravel() for x in jax.tree.leaves(moved)])
    # The update is N(0, (z S / m)^2) per coordinate: its empirical std is z S / m = 0.025. The
    # sample std of n = 256 draws has relative standard error 1 / sqrt(2n) = 4.4%: rtol 0.2 is
    # 4.5 standard errors, while a missing or doubled noise term is off by 100%.
    assert leaves.size >= 256
    np.testing.assert_allclose(leaves.std(), 1.0 * 0.1 / 4, rtol=0.2)


def _poisson_config(corpus):
    c = ptb_fedgen_edge.get_config('tiny')
    c.data.source = corpus
    c.data.verify_md5 = False
    c.fed.clients_per_round = 1  # q = 1/4: P(K_t = 0) = 0.32 per round
    c.fed.rounds = 3
    c.fed.dp.update(clip_norm=0.1, noise_multiplier=1.0, sampling='poisson', delta=1e-3)
    c.eval.every = 3
    for seed in range(50):  # the first seed whose round 1 samples nobody
        ids, present = sampling.poisson_clients(seed, 1, 4,
                                                translate.spec(c).clients.rate,
                                                translate.spec(c).clients.capacity)
        if present.sum() == 0:
            c.seed = seed
            return c
    raise AssertionError('no seed samples K_1 = 0')


def test_poisson_dp_run_with_an_empty_round_finishes_and_accounts_it(corpus, tmp_path):
    cfg = _poisson_config(corpus)
    summary = train.run(cfg, str(tmp_path / 'run'))
    with open(tmp_path / 'run' / 'metrics.jsonl') as f:
        rows = [json.loads(x) for x in f]
    assert [r['round'] for r in rows] == [1, 2, 3]
    assert rows[1]['clients_sampled'] == 0 and rows[1]['up_bytes_round'] == 0
    eps = [r['dp_epsilon'] for r in rows]
    assert eps[0] < eps[1] < eps[2] == summary['dp_epsilon']  # the empty round is accounted
    assert summary['dp_delta'] == 1e-3 and np.isfinite(summary['final_valid_ppl'])
    # Only what epsilon covers is published: no statistic of raw client updates.
    for r in rows:
        assert not {'train_loss', 'delta_norm', 'clients_used', 'dp_clipped_frac'} & set(r)
    assert os.path.exists(tmp_path / 'run' / 'summary.json')
