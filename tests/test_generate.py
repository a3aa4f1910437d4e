"""gpt.generate: greedy decoding equals an argmax of the model's logits step by step, sampling is
a function of the key, and one sampled step follows softmax(logits / T)."""
import jax
import numpy as np
import pytest
from scipy import stats

from fedgen.models import gpt

CFG = gpt.GPTConfig(vocab_size=23, n_positions=12, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture(scope='module')
def model():
    params = gpt.init_params(CFG, jax.random.PRNGKey(0))
    # Larger weights than the init, so the logits are far from uniform and the argmax moves; each
    # leaf draws its own noise (q, k and v kernels have one shape and must not move alike).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return gpt.GPT(CFG), {'params': params}


def test_greedy_generation_is_the_argmax_of_the_logits_step_by_step(model):
    net, variables = model
    prompt = np.array([[3, 17, 5], [0, 0, 11]], np.int32)
    steps = 7
    # T -> 0: the Gumbel-max draw of softmax(logits / T) is the argmax of the logits.
    out = np.asarray(gpt.generate(net, variables, prompt, steps, jax.random.PRNGKey(0), 1e-8))
    seq = prompt.copy()
    for _ in range(steps):
        logits = np.asarray(net.apply(variables, seq))[:, -1]  # the model on the prefix only
        top2 = np.sort(logits, -1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0] > 1e-4).all()  # the argmax is well defined
        seq = np.concatenate([seq, logits.argmax(-1)[:, None].astype(np.int32)], 1)
    np.testing.assert_array_equal(out, seq)
    assert len(set(seq[0, 3:].tolist())) > 1  # not a constant continuation


def test_sampling_is_a_function_of_the_key(model):
    net, variables = model
    prompt = np.array([[1, 2], [4, 8]], np.int32)
    gen = jax.jit(lambda r: gpt.generate(net, variables, prompt, 8, r, 1.5))
    a, b = np.asarray(gen(jax.random.PRNGKey(7))), np.asarray(gen(jax.random.PRNGKey(7)))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :2], prompt)
    others = [np.asarray(gen(jax.random.PRNGKey(k))) for k in range(8, 12)]
    assert any(not np.array_equal(a, o) for o in others)


@pytest.mark.parametrize('temperature', [0.7, 2.0])
def test_one_sampled_step_follows_the_tempered_softmax(model, temperature):
    net, variables = model
    prompt = np.array([[5, 9, 2]], np.int32)
    n = 4000
    keys = jax.random.split(jax.random.PRNGKey(3), n)
    draw = jax.jit(
        jax.vmap(lambda r: gpt.generate(net, variables, prompt, 1, r, temperature)[0, -1]))
    counts = np.bincount(np.asarray(draw(keys)), minlength=CFG.vocab_size)
    logits = np.asarray(net.apply(variables, prompt))[0, -1].astype(np.float64) / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    # Chi-square wants expected counts >= 5: the rare tokens are pooled into one cell, itself
    # merged into the smallest common one if still below 5.
    keep = p * n >= 5
    obs, exp = counts[keep].astype(np.float64), p[keep] * n
    rare_obs, rare_exp = counts[~keep].sum(), p[~keep].sum() * n
    if rare_exp >= 5:
        obs, exp = np.append(obs, rare_obs), np.append(exp, rare_exp)
    else:
        obs[exp.argmin()] += rare_obs
        exp[exp.argmin()] += rare_exp
    assert len(obs) >= 3
    assert stats.chisquare(obs, exp).pvalue > 1e-3
