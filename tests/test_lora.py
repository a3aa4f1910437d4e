"""LoRA invariants on a tiny GPT: B=0 is the base model, unmerged equals merged, rule errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fedgen.fl import client_state
from fedgen.lora import adapters as lora
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
    assert [('/'.join(p)) for p in qv] == [f'h/attn/{n}/kernel' for n in 'qv']  # layer-stacked
    assert len(lora.target_paths(params, 'attn_mlp')) == 6
    assert len(lora.target_paths(params, [r'h/mlp/fc/kernel$'])) == 1


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
    # Layer-stacked (B.ndim == 3): one product per layer; conv: contraction over r only.
    sa, sb = jnp.stack([a, -a, 2 * a]), jnp.stack([b, b, -b])
    np.testing.assert_allclose(lora.delta(sa, sb, 4.0),
                               np.stack([2.0 * (sa[i] @ sb[i]) for i in range(3)]))
    ca = jnp.arange(24.0).reshape(2, 2, 3, 2)
    assert lora.delta(ca, b, 4.0).shape == (2, 2, 3, 4)


def test_adapter_shapes(setup):
    _, params, _ = setup
    adapters = lora.init(jax.random.PRNGKey(0), params, 'qv', 2)
    # {q, v} x (A [L=2, 16, 2] + B [L=2, 2, 16]), the 2 layers stacked.
    shapes = {'/'.join(p): x.shape for p, x in traverse_util.flatten_dict(adapters).items()}
    assert shapes == {
        f'h/attn/{n}/{ab}': ((2, 16, 2) if ab == 'a' else (2, 2, 16))
        for n in 'qv'
        for ab in 'ab'
    }
    a = adapters['h']['attn']['q']['a']
    assert not np.allclose(a[0], a[1])  # each layer draws its own A
    np.testing.assert_allclose(np.std(np.asarray(a)), 1 / np.sqrt(16), rtol=0.3)  # fan_in = in


def test_each_layer_adapter_acts_on_its_own_layer(setup):
    model, params, tokens = setup
    adapters = lora.init(jax.random.PRNGKey(3), params, 'qv', 2)
    b = adapters['h']['attn']['v']['b']
    only_1 = {'h': {'attn': {'v': {'a': adapters['h']['attn']['v']['a'], 'b': b.at[1].set(0.3)}}}}
    merged = lora.merge(params, only_1, CFG.lora_alpha)
    kern = lambda p: np.asarray(p['h']['attn']['v']['kernel'])
    np.testing.assert_array_equal(kern(merged)[0], kern(params)[0])  # layer 0 untouched
    assert np.abs(kern(merged)[1] - kern(params)[1]).max() > 1e-3
    np.testing.assert_allclose(model.apply({
        'params': params,
        'lora': only_1
    }, tokens),
                               model.apply({'params': merged}, tokens),
                               atol=2e-5,
                               rtol=1e-5)


@pytest.mark.parametrize('rank', [0, -1, 17, 2.5])
def test_bad_rank(setup, rank):
    _, params, _ = setup
    with pytest.raises(ValueError, match=r'^rank must be an int'):
        lora.init(jax.random.PRNGKey(0), params, 'qv', rank)
    with pytest.raises(ValueError, match=r'^lora\.rank must be an int'):
        lora.init(jax.random.PRNGKey(0), params, 'qv', rank, section='lora.')


def test_rule_matching_nothing(setup):
    _, params, _ = setup
    with pytest.raises(ValueError, match=r'^targets rule'):
        lora.init(jax.random.PRNGKey(0), params, [r'decoder/cross/kernel$'], 2)
    with pytest.raises(ValueError, match=r'^lora\.targets rule'):
        lora.init(jax.random.PRNGKey(0), params, [r'decoder/cross/kernel$'], 2, section='lora.')
    with pytest.raises(ValueError, match=r'^targets must name'):
        lora.resolve_rules('')
    with pytest.raises(ValueError, match=r'^lora\.targets must name'):
        lora.resolve_rules('', section='lora.')
