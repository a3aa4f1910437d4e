"""The Llama decoder: logits vs FlaxLlamaForCausalLM, KV-cache decoding, bf16 and remat."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fedgen.lora import adapters as lora
from fedgen.models import llama
from fedgen.io import weights_hf
from helpers_models import TINY_LLAMA_HF

transformers = pytest.importorskip('transformers')

# The tiny GQA Llama (4 query heads over 2 KV heads), RMSNorm eps 1e-6. FlaxLlama hard-codes RoPE
# theta 10000 (it ignores config.rope_theta), so the Flax parity runs at theta 1e4; test_weights
# checks theta 1e5 against torch's LlamaForCausalLM, which honours it.
HF = dict(TINY_LLAMA_HF, rope_theta=1e4, rms_norm_eps=1e-6)
CFG = weights_hf.llama_config_from_hf(dict(HF, tie_word_embeddings=False))


def _hf_flax(tie: bool):
    """A random FlaxLlama with weights large enough (std 0.2, norms != 1) that all leaves matter."""
    hc = transformers.LlamaConfig(**HF, tie_word_embeddings=tie)
    hf = transformers.FlaxLlamaForCausalLM(hc, seed=0)
    flat = traverse_util.flatten_dict(hf.params)
    rng = np.random.default_rng(0)
    for k in flat:
        if k[-1] == 'weight':  # RMSNorm gains
            flat[k] = flat[k] + 0.3 * rng.standard_normal(flat[k].shape).astype(np.float32)
    if tie:  # FlaxLlama always applies lm_head; tie it by hand to the embedding
        flat[('lm_head', 'kernel')] = flat[('model', 'embed_tokens', 'embedding')].T
    return hf, traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize('tie', [True, False])
def test_logits_match_hf_flax_llama(tie):
    hf, hf_params = _hf_flax(tie)
    flat = {'.'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(hf_params).items()}
    params = weights_hf.llama_from_hf_tensors(flat, tie)  # the Flax-layout loader
    assert ('lm_head' in params) == (not tie)
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tie)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 20), 0, CFG.vocab_size)
    ours = jax.jit(llama.Llama(cfg).apply)({'params': params}, tokens)
    ref = hf(tokens, params=hf_params).logits
    assert float(jnp.abs(ref).max()) > 1.0  # non-trivial logits
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_init_param_layout_matches_hf_names():
    params = llama.init_params(CFG, jax.random.PRNGKey(0))
    paths = {'/'.join(p) for p in traverse_util.flatten_dict(params)}
    assert 'layers/self_attn/k_proj/kernel' in paths and 'lm_head/kernel' in paths
    assert params['layers']['self_attn']['k_proj']['kernel'].shape == (2, 32, 16)  # [L, in, out]
    assert params['layers']['mlp']['down_proj']['kernel'].shape == (2, 48, 32)
    assert params['layers']['input_layernorm']['weight'].shape == (2, 32)
    k = params['layers']['self_attn']['k_proj']['kernel']
    assert not np.allclose(k[0], k[1])  # each layer is initialized from its own rng


@pytest.fixture(scope='module')
def tiny():
    params = llama.init_params(CFG, jax.random.PRNGKey(0))
    flat = traverse_util.flatten_dict(params)  # peaky logits: scale the matrices, not the norms
    params = traverse_util.unflatten_dict({
        k: v * 8.0 if k[-1] in ('kernel', 'embedding') else v
        for k, v in flat.items()
    })
    return llama.Llama(CFG), params


def test_kv_cache_decode_equals_full_forward(tiny):
    model, params = tiny
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, CFG.vocab_size)
    full = jax.jit(model.apply)({'params': params}, tokens)
    decode = jax.jit(
        lambda x, c, t: model.apply({'params': params}, x, c, t, method=llama.Llama.decode))
    first, cache = decode(tokens[:, :7], llama.init_cache(CFG, 2, 16), 0)
    outs = [first]
    for t in range(7, 12):
        lg, cache = decode(tokens[:, t:t + 1], cache, t)
        outs.append(lg)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_greedy_and_sampled_generation_match_uncached_reference(tiny):
    model, params = tiny
    prompt = np.array([[3, 5, 7], [11, 2, 9]], np.int32)
    steps, rng = 6, jax.random.PRNGKey(7)
    gen = jax.jit(lambda p, r, temp: llama.generate(model, {'params': p}, prompt, steps, r, temp),
                  static_argnums=2)
    keys = jax.random.split(rng, steps)
    fwd = jax.jit(lambda x: model.apply({'params': params}, x))
    for temp in (0.0, 0.7):
        # Rerun the whole (zero-padded, causal so padding is invisible) sequence each step.
        ref = np.zeros((2, 3 + steps), np.int32)
        ref[:, :3] = prompt
        for i in range(steps):
            lg = fwd(ref)[:, 2 + i]
            nxt = (jnp.argmax(lg, -1) if temp == 0 else jax.random.categorical(keys[i], lg / temp))
            ref[:, 3 + i] = np.asarray(nxt)
        got = np.asarray(gen(params, rng, temp))
        np.testing.assert_array_equal(got, ref)
    assert not np.array_equal(gen(params, rng, 0.0), gen(params, rng, 0.7))


def test_lora_presets_zero_b_is_base_and_grads_flow(tiny):
    model, params = tiny
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 9), 0, CFG.vocab_size)
    ad = lora.init(jax.random.PRNGKey(5), params, 'llama_qv', 4)
    paths = {'/'.join(p) for p in traverse_util.flatten_dict(ad)}
    assert paths == {f'layers/self_attn/{m}_proj/{x}' for m in 'qv' for x in 'ab'}
    assert ad['layers']['self_attn']['q_proj']['b'].shape == (2, 4, 32)  # [L, r, out]
    fwd = jax.jit(model.apply)
    base = fwd({'params': params}, tokens)
    np.testing.assert_array_equal(fwd({'params': params, 'lora': ad}, tokens), base)
    full = lora.init(jax.random.PRNGKey(5), params, 'llama_attn_mlp', 2)
    assert len(traverse_util.flatten_dict(full)) == 2 * 7
    loss = lambda a: model.apply({'params': params, 'lora': a}, tokens).sum()
    g = jax.jit(jax.grad(loss))(ad)
    gb = g['layers']['self_attn']['q_proj']['b']
    assert float(jnp.abs(gb[0]).max()) > 0 and float(jnp.abs(gb[1]).max()) > 0


def test_bf16_and_remat(tiny):
    model, params = tiny
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 9), 0, CFG.vocab_size)
    ad = lora.init(jax.random.PRNGKey(5), params, 'llama_qv', 4)
    ad = jax.tree.map(lambda x: x + 0.01, ad)  # B != 0
    loss = lambda m, p, a: jnp.mean(m.apply({'params': p, 'lora': a}, tokens)**2)
    vg = jax.jit(jax.value_and_grad(loss, argnums=2), static_argnums=0)
    ref_l, ref_g = vg(model, params, ad)
    rm = llama.Llama(dataclasses.replace(CFG, remat=True))
    l, g = vg(rm, params, ad)
    np.testing.assert_allclose(l, ref_l, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    bm = llama.Llama(dataclasses.replace(CFG, dtype='bfloat16'))
    bp = llama.cast_frozen(params, 'bfloat16')
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bp))
    logits = jax.jit(bm.apply)({'params': bp, 'lora': ad}, tokens)
    assert logits.dtype == jnp.float32
    ref_logits = jax.jit(model.apply)({'params': params, 'lora': ad}, tokens)
    err = float(jnp.abs(logits - ref_logits).max() / jnp.abs(ref_logits).max())
    assert 0 < err < 0.05, err  # bf16 rounding, not a different function
    l, g = vg(bm, bp, ad)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g))  # adapters stay f32
    np.testing.assert_allclose(l, ref_l, rtol=0.05)


def test_bad_config():
    with pytest.raises(ValueError, match=r'^n_kv_head must divide n_head='):
        llama.validate(dataclasses.replace(CFG, n_kv_head=3))
    with pytest.raises(ValueError, match=r'^model\.n_kv_head must divide model\.n_head='):
        llama.validate(dataclasses.replace(CFG, n_kv_head=3), section='model.')
    with pytest.raises(ValueError, match=r'^model\.dtype must be one of '):
        llama.validate(dataclasses.replace(CFG, dtype='float16'), section='model.')
    with pytest.raises(ValueError, match='model.n_positions'):
        llama.generate(llama.Llama(CFG), {}, np.zeros((1, 30), np.int32), 5, jax.random.PRNGKey(0))


@pytest.mark.parametrize('tie', [False, True])
def test_chunked_cross_entropy_equals_plain_loss_and_gradient(tiny, tie):
    """Token chunks (ce_chunk), vocabulary chunks (ce_vocab_chunk; one that does not divide V,
    so the last chunk is read from V - size and masked; one larger than V) and both: the plain
    loss and LoRA gradient, for an untied head and for a tied head with remat per block."""
    from fedgen.tasks import objectives
    model, params = tiny
    if tie:
        model = llama.Llama(dataclasses.replace(CFG, tie_word_embeddings=True, remat=True))
        params = {k: v for k, v in params.items() if k != 'lm_head'}
    tokens = jax.random.randint(jax.random.PRNGKey(8), (3, 10), 0, CFG.vocab_size)
    batch = {'tokens': tokens, 'weight': jnp.array([1.0, 0.0, 2.0])}
    ad = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.PRNGKey(5), params, 'llama_qv', 2))
    v = CFG.vocab_size
    assert v % 7 != 0

    def vg(loss_fn):
        f = lambda a: loss_fn({'params': params, 'lora': a}, batch, None)
        return jax.jit(jax.value_and_grad(f, has_aux=True))(ad)

    (l0, n0), g0 = vg(objectives.next_token_loss(model))
    for chunk, vocab in ((7, 0), (0, v // 7), (7, v // 7), (0, v + 5)):
        (l1, n1), g1 = vg(objectives.chunked_next_token_loss(model, chunk, vocab))
        assert float(n0) == float(n1) == 27.0  # 27 tokens in chunks of 7: the last is padded
        np.testing.assert_allclose(l1, l0, rtol=1e-6, err_msg=f'{chunk}, {vocab}')
        # the online softmax sums in another order: float32 rounding of gradients up to ~1
        atol = 1e-6 if vocab else 1e-7
        for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
            assert np.abs(y).max() > 1e-2  # a gradient that can be wrong
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol, err_msg=f'{chunk}, {vocab}')
    h = model.apply({'params': params}, tokens, method='hidden')
    whole = model.apply({'params': params}, h, method='unembed')
    part = model.apply({'params': params}, h, v - 9, 9, method='unembed_slice')
    np.testing.assert_allclose(part, whole[..., v - 9:], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match='^chunk and vocab_chunk must be ints >= 0, one of them'):
        objectives.chunked_next_token_loss(model, 0)
    with pytest.raises(ValueError, match='^vocab_chunk must be an int >= 0'):
        objectives.token_nll_fn(model, 0, -1)
