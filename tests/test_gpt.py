"""The GPT-2-architecture decoder against transformers' FlaxGPT2LMHeadModel on the same weights."""
import jax
import numpy as np
import pytest

from fedgen.models import gpt

transformers = pytest.importorskip('transformers')

CFG = gpt.GPTConfig(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4)


def _hf_model():
    hf_cfg = transformers.GPT2Config(vocab_size=CFG.vocab_size,
                                     n_positions=CFG.n_positions,
                                     n_embd=CFG.n_embd,
                                     n_layer=CFG.n_layer,
                                     n_head=CFG.n_head)
    return transformers.FlaxGPT2LMHeadModel(hf_cfg, seed=0)


def test_logits_match_hf_flax_gpt2():
    params = gpt.init_params(CFG, jax.random.PRNGKey(0))
    # Non-trivial LayerNorm and bias values so every mapped leaf matters.
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                          params)
    hf = _hf_model()
    tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 16), 0, CFG.vocab_size)
    ours = gpt.GPT(CFG).apply({'params': params}, tokens)
    ref = hf(tokens, params=gpt.to_hf(params)).logits
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_hf_layout_round_trip():
    hf = _hf_model()
    ours = gpt.from_hf(hf.params)
    back = gpt.to_hf(ours)
    assert jax.tree.structure(back) == jax.tree.structure(hf.params)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(hf.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_generate_shape_and_determinism():
    params = gpt.init_params(CFG, jax.random.PRNGKey(0))
    model = gpt.GPT(CFG)
    prompt = np.zeros((2, 3), np.int32)
    a = gpt.generate(model, {'params': params}, prompt, 5, jax.random.PRNGKey(7))
    b = gpt.generate(model, {'params': params}, prompt, 5, jax.random.PRNGKey(7))
    assert a.shape == (2, 8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :3], prompt)


def test_bad_config():
    with pytest.raises(ValueError, match=r'^n_head must divide n_embd=30, got 4$'):
        gpt.validate(gpt.GPTConfig(n_embd=30, n_head=4))
    with pytest.raises(ValueError, match=r'^model\.n_head must divide model\.n_embd=30, got 4$'):
        gpt.validate(gpt.GPTConfig(n_embd=30, n_head=4), section='model.')
    with pytest.raises(ValueError, match=r'^n_layer must be an int >= 1, got 0$'):
        gpt.validate(gpt.GPTConfig(n_layer=0))


def test_vocabulary_chunked_cross_entropy_equals_the_whole_softmax():
    """GPT's unembed_slice is a slice of unembed; objectives.vocab_chunked_nll (chunks of 16 of
    V = 61: the last one read from 45 and masked) equals the whole softmax's NLL and its
    gradient with respect to the hidden states."""
    from fedgen.tasks import objectives
    model = gpt.GPT(CFG)
    params = gpt.init_params(CFG, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: 4.0 * x, params)  # peaky logits
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, CFG.vocab_size)
    h = model.apply({'params': params}, tokens, method='hidden').reshape(18, CFG.n_embd)
    y = tokens.reshape(18)
    whole = model.apply({'params': params}, h, method='unembed')
    np.testing.assert_allclose(model.apply({'params': params}, h, 45, 16, method='unembed_slice'),
                               whole[:, 45:],
                               rtol=1e-6,
                               atol=1e-6)
    ref = lambda x: objectives.token_nll(model.apply({'params': params}, x, method='unembed'), y
                                         ).sum()
    got = lambda x: objectives.vocab_chunked_nll(model, {'params': params}, x, y, 16).sum()
    np.testing.assert_allclose(got(h), ref(h), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(got)(h), jax.grad(ref)(h), rtol=1e-5, atol=1e-6)
