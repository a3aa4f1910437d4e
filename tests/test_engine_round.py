"""The engine's round with faults, privacy and heterogeneous ranks: one trace, exact arithmetic."""
import dataclasses

import chex
import jax
import numpy as np
import optax

from conftest import TINY
from fedgen import aggregators, algorithms
from fedgen.fl import fates
from fedgen.tasks import objectives
from fedgen.data import batching
from fedgen.models import gpt
from fedgen.privacy import dp as dp_lib

LORA = algorithms.LoraSpec(2, 16.0, ('attn', ))


def method(**kw):
    base = dict(name='fedgen_edge',
                num_clients=6,
                client_tx=optax.sgd(0.5),
                server_tx=optax.sgd(1.0),
                lora=LORA,
                chunk=2)
    return algorithms.MethodParams(**{**base, **kw})


def build(tiny, p, lora=LORA, loss_fn=None):
    p = dataclasses.replace(p, lora=lora)
    frozen, trainable = algorithms.variables(p, tiny.params, jax.random.PRNGKey(1))
    alg = algorithms.make(p, loss_fn or tiny.loss_fn)
    return alg, frozen, alg.init(trainable, jax.random.PRNGKey(2))


def counted(alg):
    traces = []

    def apply(state, frozen, data):
        traces.append(1)
        return alg.apply(state, frozen, data)

    return jax.jit(apply), traces


def test_fates_trace_once_and_equal_dropping_by_hand(tiny):
    p = method(faults=algorithms.engine.Faults(dropout=0.5, straggler=0.0))
    alg, frozen, state = build(tiny, p)
    apply, traces = counted(alg)
    ids = [0, 1, 2, 4]
    s = state
    for rnd, rate in enumerate((0.5, 0.2, 0.7)):
        data = tiny.round_data(ids, rnd).replace(rates=fates.FateRates.of(rate, 0.3, 0.5))
        s, m = apply(s, frozen, data)
    assert len(traces) == 1  # rates changed every round, the program did not

    # Round 0 by hand: draw the same fates, then a fault-free round without the dropped clients.
    data = tiny.round_data(ids, 0).replace(rates=fates.FateRates.of(0.5, 0.0, 1.0))
    got, m = jax.jit(alg.apply)(state, frozen, data)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, algorithms.engine.FATE_STREAM), 0)
    report = np.asarray(fates.draw(key, np.asarray(ids, np.int32), data.rates).report)
    assert 0 < report.sum() < len(ids)  # the example has both fates
    assert float(m['clients_reported']) == report.sum()
    clean_alg, _, _ = build(tiny, method())
    kept = batching.drop_absent(tiny.round_data(ids, 0), report)
    want, _ = jax.jit(clean_alg.apply)(state, frozen, kept)
    chex.assert_trees_all_close(got.trainable, want.trainable, atol=1e-6)


def test_dp_round_traces_once_over_varying_counts_and_z0_is_uniform_fedavg(tiny):
    params = dp_lib.make_params(float('inf'), 0.0, 4)
    p = method(aggregator=aggregators.dp_mean(params), log_diagnostics=True)
    alg, frozen, state = build(tiny, p)
    apply, traces = counted(alg)
    s = state
    for rnd, present in enumerate(([1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1])):
        data = batching.drop_absent(tiny.round_data([0, 1, 2, 4], rnd), np.float32(present))
        s, m = apply(s, frozen, data)
        assert float(m['clients_used']) == sum(present)
    assert len(traces) == 1

    # z = 0, C = inf, every client present: the mean over the expected count m = C equals
    # FedAvg with uniform weights (equal n_k).
    data = tiny.round_data([0, 1, 2, 4], 0)
    data = data.replace(n_k=np.ones_like(data.n_k))
    got, _ = jax.jit(alg.apply)(state, frozen, data)
    plain, _, _ = build(tiny, method())
    want, _ = jax.jit(plain.apply)(state, frozen, data)
    chex.assert_trees_all_close(got.trainable, want.trainable, atol=1e-6)


def test_rank_two_client_in_rank_eight_program_equals_rank_two_program(tiny):
    wide = algorithms.LoraSpec(8, 16.0, ('attn', ))
    p = method(client_ranks=(2, 8, 4, 8, 2, 8),
               aggregator=aggregators.hetlora(aggregators.weighted_mean()))
    alg, frozen, state = build(tiny, p, wide)
    apply, traces = counted(alg)
    for rnd, ids in enumerate(([0], [1], [2])):  # different ranks, one program
        apply(state, frozen, tiny.round_data(ids, rnd))
    assert len(traces) == 1
    got, _ = apply(state, frozen, tiny.round_data([0], 0))  # client 0 has r_k = 2

    # The same client alone with rank 2 and the model's alpha scaled so alpha' / 2 = alpha / 8.
    narrow = algorithms.LoraSpec(2, 4.0, ('attn', ))
    model = gpt.GPT(dataclasses.replace(TINY, lora_alpha=TINY.lora_alpha * 2 / 8))
    alg2, _, state2 = build(tiny, method(), narrow, objectives.next_token_loss(model))
    first = jax.tree_util.tree_map_with_path(
        lambda path, x: x[..., :2] if path[-1].key == 'a' else x[..., :2, :], state.trainable)
    state2 = state2.replace(trainable=first, opt_state=alg2.init(first, state.rng).opt_state)
    state2 = state2.replace(rng=state.rng)
    want, _ = jax.jit(alg2.apply)(state2, frozen, tiny.round_data([0], 0))
    got_first = jax.tree_util.tree_map_with_path(
        lambda path, x: x[..., :2] if path[-1].key == 'a' else x[..., :2, :], got.trainable)
    chex.assert_trees_all_close(got_first, want.trainable, atol=1e-6)
