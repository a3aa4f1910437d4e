"""Exact byte accounting from the trees actually sent, per method, up and down."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedgen import algorithms
from fedgen.fl import comm
from fedgen.lora import adapters as lora
from fedgen.fl.algorithm import Algorithm

SPEC = algorithms.LoraSpec(rank=2, alpha=16.0, targets=('attn', ))


def test_counts_from_shapes_and_dtypes():
    tree = {'lora': {'a': jnp.zeros((8, 2)), 'b': jnp.zeros((2, 8), jnp.bfloat16)}}
    assert comm.num_params(tree) == 32
    assert comm.num_bytes(tree) == 8 * 2 * 4 + 2 * 8 * 2
    abstract = jax.eval_shape(lambda: tree)  # ShapeDtypeStructs count the same
    assert comm.num_bytes(abstract) == comm.num_bytes(tree)


def test_round_cost_counts_upload_and_download_separately():
    tree = {'lora': {'a': jnp.zeros((8, 2)), 'b': jnp.zeros((2, 8), jnp.bfloat16)}}
    alg = Algorithm(init=None,
                    apply=None,
                    upload=lambda d: {'a': d['lora']['a']},
                    download=lambda w: w)
    cost = comm.round_cost(alg, tree, num_clients=10)
    assert cost == comm.RoundCost(64, 96, 640, 960)


def _bytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _a_bytes(adapters):
    flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
    return sum(x.size * x.dtype.itemsize for path, x in flat if path[-1].key == 'a')


@pytest.mark.parametrize('name', algorithms.METHODS)
def test_bytes_per_method(tiny, name):
    """Uplink and downlink per client for every method, against the trees counted by hand:
    adapters both ways (FedGen-Edge, FedProx, Ditto: its personal model never leaves the client),
    A only both ways (FedSA: B stays local), the whole model (full FedAvg), nothing at all
    (local-only, centralized)."""
    extra = {'fedprox': dict(prox_mu=0.1), 'ditto': dict(ditto_lambda=0.1)}.get(name, {})
    p = algorithms.MethodParams(name=name,
                                num_clients=6,
                                client_tx=optax.sgd(0.1),
                                server_tx=optax.sgd(1.0),
                                lora=SPEC,
                                **extra)
    _, trainable = algorithms.variables(p, tiny.params, jax.random.PRNGKey(0))
    alg = algorithms.make(p, tiny.loss_fn)
    adapters = lora.init(jax.random.PRNGKey(0), tiny.params, SPEC.targets, SPEC.rank)
    per = {
        'fedgen_edge': _bytes(adapters),
        'fedprox': _bytes(adapters),
        'ditto': _bytes(adapters),
        'fedsa': _a_bytes(adapters),
        'fedavg_full': _bytes(tiny.params),
        'local_only': 0,
        'centralized': 0,
    }[name]
    cost = comm.round_cost(alg, trainable, 5)
    assert cost == comm.RoundCost(per, per, 5 * per, 5 * per)
    if name == 'fedsa':
        assert 0 < per < _bytes(adapters)


def test_lora_share_of_full_gpt_under_one_percent():
    from fedgen.models import gpt
    cfg = gpt.GPTConfig()  # the PTB default architecture
    params = jax.eval_shape(lambda: gpt.init_params(cfg, jax.random.PRNGKey(0)))
    adapters = jax.eval_shape(lambda p: lora.init(jax.random.PRNGKey(0), p, 'qv', 8), params)
    assert comm.num_bytes(adapters) / comm.num_bytes(params) < 0.01


def test_accumulate():
    c = comm.RoundCost(1, 2, 10, 20)
    tot = comm.accumulate(comm.accumulate({}, c), c)
    assert tot == {'up_bytes': 20, 'down_bytes': 40}


def test_round_bytes_by_hand():
    ids = np.array([3, 0, 5, 1])  # client 9, the last of N = 10, is not in this round
    sampled = np.array([1, 1, 1, 0])  # slot 3 is padding
    reported = np.array([1, 0, 1, 0])  # client 0 dropped after download
    assert comm.round_bytes(7, 11, ids, sampled, reported) == (2 * 7, 3 * 11)
    per_up = np.arange(10) * 100  # per client id, e.g. true ranks r_k
    per_down = np.arange(10) + 1000
    up, down = comm.round_bytes(per_up, per_down, ids, sampled, reported)
    assert up == 300 + 500
    assert down == 1003 + 1000 + 1005
