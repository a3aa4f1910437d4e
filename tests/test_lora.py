"""LoRA invariants on a tiny GPT: B=0 is the base model, unmerged equals merged, rule errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fedgen import client_state, lora
from fedgen.models import gpt

CFG = gpt.GPTConfig(vocab_size=37, n_positions=12, n_embd=16, n_layer=2, n_head=2, lora_alpha=8.0)


@pytest.fixture(scope='module')
def setup():
    params = gpt.init_params(CFG, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 12), 0, CFG.vocab_size)
    return gpt.GPT(CFG), params, tokens


def test_targets_follow_rules(setup):
    _, params, _ = setup
    qv = lora.target_paths(params, 'qv')
    assert [('/'.join(p)) for p in qv] == [f'h_{i}/attn/{n}/kernel' for i in (0, 1) for n in 'qv']
    assert len(lora.target_paths(params, 'attn_mlp')) == 2 * 6
    assert len(lora.target_paths(params, [r'h_1/mlp/fc/kernel$'])) == 1


def test_zero_b_is_base_model(setup):
    model, params, tokens = setup
    adapters = lora.init(jax.random.PRNGKey(2), params, 'attn_mlp', 4)
    a_part, b_part = client_state.split(adapters, {'b'})
    assert all(np.all(b == 0) for b in jax.tree.leaves(b_part))
    assert all(np.all(a != 0) for a in jax.tree.leaves(a_part))
    base = model.apply({'params': params}, tokens)
    with_lora = model.apply({'params': params, 'lora': adapters}, tokens)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(with_lora))


def test_unmerged_equals_merged_and_changes_output(setup):
    model, params, tokens = setup
    adapters = lora.init(jax.random.PRNGKey(3), params, 'attn_mlp', 4)
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(4), x.shape),
                            adapters)
    unmerged = model.apply({'params': params, 'lora': adapters}, tokens)
    merged = model.apply({'params': lora.merge(params, adapters, CFG.lora_alpha)}, tokens)
    base = model.apply({'params': params}, tokens)
    np.testing.assert_allclose(np.asarray(unmerged), np.asarray(merged), atol=2e-5, rtol=1e-5)
    assert np.abs(np.asarray(unmerged) - np.asarray(base)).max() > 1e-3


def test_delta_is_scaled_product():
    a = jnp.arange(6.0).reshape(3, 2)
    b = jnp.arange(8.0).reshape(2, 4)
    np.testing.assert_allclose(lora.delta(a, b, alpha=4.0), 2.0 * (np.asarray(a) @ np.asarray(b)))
    assert lora.scale(4.0, a) == 2.0 and lora.scale(4.0, jnp.zeros((5, 8))) == 0.5


def test_adapter_shapes(setup):
    _, params, _ = setup
    adapters = lora.init(jax.random.PRNGKey(0), params, 'qv', 2)
    # 2 layers x {q, v} x (A [16, 2] + B [2, 16]).
    shapes = {'/'.join(p): x.shape for p, x in traverse_util.flatten_dict(adapters).items()}
    assert shapes == {
        f'h_{i}/attn/{n}/{ab}': ((16, 2) if ab == 'a' else (2, 16))
        for i in (0, 1)
        for n in 'qv'
        for ab in 'ab'
    }


@pytest.mark.parametrize('rank', [0, -1, 17, 2.5])
def test_bad_rank(setup, rank):
    _, params, _ = setup
    with pytest.raises(ValueError, match='lora.rank'):
        lora.init(jax.random.PRNGKey(0), params, 'qv', rank)


def test_rule_matching_nothing(setup):
    _, params, _ = setup
    with pytest.raises(ValueError, match='lora.targets'):
        lora.init(jax.random.PRNGKey(0), params, [r'decoder/cross/kernel$'], 2)
    with pytest.raises(ValueError, match='lora.targets'):
        lora.resolve_rules('')
