"""Sliding-window word-level perplexity against a numpy loop over targets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedgen.metrics import perplexity

V = 13
E = np.random.default_rng(0).standard_normal((V, V)).astype(np.float32)


def decay_logits_np(context):
    """A context-dependent 'LM': logits = sum_k E[c_k] 0.5^(len - 1 - k)."""
    w = 0.5**np.arange(len(context))[::-1]
    return (E[np.asarray(context)] * w[:, None]).sum(0)


def decay_nll_jax(variables, inputs, targets):
    del variables
    w = inputs.shape[1]
    t = jnp.arange(w)
    decay = jnp.where(t[:, None] >= t[None], 0.5**(t[:, None] - t[None]).astype(jnp.float32), 0.)
    logits = jnp.einsum('tk,bkv->btv', decay, jnp.asarray(E)[inputs])
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[...,
                                                                                              0]


def reference_nll(stream, window, stride):
    """Independent loop: slide by S, pull the last window back to end at N, score each target
    once with the context its window gives it (inputs s[b .. j])."""
    n, total, scored, contexts, b = len(stream) - 1, 0.0, set(), {}, 0
    while True:
        b_eff = min(b, max(n - window, 0))
        for j in range(b_eff, min(b_eff + window, n)):
            if j in scored:
                continue
            scored.add(j)
            ctx = stream[b_eff:j + 1]
            contexts[j] = len(ctx)
            logits = decay_logits_np(ctx).astype(np.float64)
            total += np.log(
                np.exp(logits - logits.max()).sum()) + logits.max() - logits[stream[j + 1]]
        if b_eff + window >= n:
            break
        b += stride
    assert scored == set(range(n))
    return total, contexts


@pytest.mark.parametrize('n,window,stride', [(40, 8, 3), (41, 8, 8), (7, 10, 4), (33, 6, 1)])
def test_total_nll_matches_numpy_loop(n, window, stride):
    stream = np.random.default_rng(n).integers(0, V, n + 1)
    win = perplexity.sliding_windows(stream, window, stride)
    ref, contexts = reference_nll(stream, window, stride)
    total, count = perplexity.total_nll(decay_nll_jax, None, win.inputs, win.targets, win.mask, 3)
    assert int(count) == n
    np.testing.assert_allclose(float(total), ref, rtol=1e-5)
    # Same contexts as the loop; past the first window each target sees >= W - S + 1 tokens.
    scored = np.concatenate([win.context[i][win.mask[i] > 0] for i in range(len(win.inputs))])
    assert scored.tolist() == [contexts[j] for j in range(n)]
    assert (scored[min(window, n):] >= window - stride + 1).all()


def test_hand_example_windows():
    win = perplexity.sliding_windows(np.arange(12), 4, 3)  # N = 11 targets
    np.testing.assert_array_equal(win.inputs[:, 0], [0, 3, 6, 7])  # last window pulled back
    np.testing.assert_array_equal(win.mask.sum(1), [4, 3, 3, 1])
    np.testing.assert_array_equal(win.targets[3][win.mask[3] > 0], [11])
    np.testing.assert_array_equal(win.context[3][win.mask[3] > 0], [4])


def test_context_free_model_is_window_invariant():
    stream = np.random.default_rng(1).integers(0, V, 60)

    def bigram(table, x, y):
        lg = table[x]
        return jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, y[..., None], -1)[..., 0]

    lg = E[stream[:-1]]
    full = float(np.sum(np.log(np.exp(lg).sum(-1)) - lg[np.arange(59), stream[1:]]))
    for w, s in ((5, 5), (16, 4), (59, 1), (80, 80)):
        got = perplexity.evaluator(bigram, stream, 59, w, s, batch_size=4)(jnp.asarray(E))
        np.testing.assert_allclose(got['nll_sum'], full, rtol=1e-5)
        assert got['tokens'] == 59 and (got['window'], got['stride']) == (w, s)
        np.testing.assert_allclose(got['ppl'], np.exp(full / 59), rtol=1e-5)


def test_word_count_and_ppl():
    text = ' the company said\n N <unk> fell\n'
    assert perplexity.count_words(text) == 6 + 2
    assert perplexity.word_perplexity(8 * np.log(50.0), 8) == pytest.approx(50.0)
    # a subword stream with 12 tokens for the same 8 words: NLL is normalised by words
    assert perplexity.word_perplexity(12 * 2.0, 8) == pytest.approx(np.exp(3.0))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r'^stride must be an int in \[1, window=4\]'):
        perplexity.sliding_windows(np.arange(10), 4, 5)
    with pytest.raises(ValueError, match=r'^eval\.stride must be an int in \[1, eval\.window=4\]'):
        perplexity.sliding_windows(np.arange(10), 4, 5, section='eval.')
    with pytest.raises(ValueError, match='^window must be'):
        perplexity.sliding_windows(np.arange(10), 0, 1)
    with pytest.raises(ValueError, match='no token to score'):
        perplexity.sliding_windows(np.arange(1), 4, 2)
