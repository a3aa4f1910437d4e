"""Exact byte accounting from the trees actually sent."""
import jax
import jax.numpy as jnp

from fedgen import comm, lora


def test_round_cost_counts_leaf_bytes():
    tree = {'lora': {'a': jnp.zeros((8, 2)), 'b': jnp.zeros((2, 8), jnp.bfloat16)}}
    cost = comm.round_cost(lambda d: d, tree, num_clients=10)
    per = 8 * 2 * 4 + 2 * 8 * 2
    assert cost == comm.RoundCost(per, per, 10 * per, 10 * per)
    only_a = comm.round_cost(lambda d: lora.select(d, {'a'}), tree, 10)
    assert only_a.up_per_client == 8 * 2 * 4 and only_a.down_per_client == per


def test_accumulate():
    c = comm.RoundCost(1, 2, 10, 20)
    tot = comm.accumulate(comm.accumulate({}, c), c)
    assert tot == {'up_bytes': 20, 'down_bytes': 40}


def test_lora_share_of_full_gpt_under_one_percent():
    from fedgen.models import gpt
    cfg = gpt.GPTConfig()  # the PTB default architecture
    params = jax.eval_shape(lambda: gpt.init_params(cfg, jax.random.PRNGKey(0)))
    adapters = jax.eval_shape(lambda p: lora.init(jax.random.PRNGKey(0), p, 'qv', 8), params)
    assert lora.num_bytes(adapters) / lora.num_bytes(params) < 0.01
