"""Task losses. Every loss has the signature

    loss_fn(variables, batch, rng) -> (mean_loss, weight)

where ``variables`` is the linen variable dict ({'params': ..., 'lora': ...}), ``batch`` a dict of
arrays with a leading batch axis B and a per-example ``weight`` [B] (0 marks padding), and
``weight`` the number of loss units (tokens or images) the mean is over, so means can be combined
exactly across batches and clients as sum(mean * weight) / sum(weight).
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[dict, dict, jax.Array], tuple[jax.Array, jax.Array]]


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target]: logits [..., V], targets [...] int -> [...] float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def next_token_loss(model: nn.Module) -> LossFn:
    """Masked next-token cross-entropy for a causal LM.

    batch['tokens'] [B, T+1] int32, batch['weight'] [B]. With inputs x = tokens[:, :T] and targets
    y = tokens[:, 1:], the loss is

        L = sum_b w_b sum_t nll(b, t) / (T sum_b w_b),

    i.e. the mean NLL per predicted token (exp(L) is the word-level perplexity on PTB).
    """

    def loss_fn(variables, batch, rng):
        del rng
        tokens, w = batch['tokens'], batch['weight'].astype(jnp.float32)
        nll = token_nll(model.apply(variables, tokens[:, :-1]), tokens[:, 1:])
        count = w.sum() * nll.shape[1]
        return (nll.sum(-1) * w).sum() / jnp.maximum(count, 1.0), count

    return loss_fn


def token_nll_fn(model: nn.Module, chunk: int = 0) -> Callable:
    """nll(variables, inputs [B, T], targets [B, T]) -> per-token NLL [B, T] float32.

    With ``chunk`` = 0 the [B, T, V] logits are formed at once. With ``chunk`` >= 1 (config
    model.ce_chunk) they are never materialized: the B T final hidden states (``model.hidden``)
    are cut into chunks of ``chunk`` tokens, and each chunk's logits come from ``model.unembed``
    inside ``jax.checkpoint`` under ``lax.map``, so the forward and the backward pass hold one
    [chunk, V] block at a time (the backward recomputes it). Same values and gradients.
    """
    if not (isinstance(chunk, int) and chunk >= 0):
        raise ValueError(f'chunk must be an int >= 0 (0: no chunking), got {chunk!r}')

    def whole(variables, inputs, targets):
        return token_nll(model.apply(variables, inputs), targets)

    def chunked(variables, inputs, targets):
        h = model.apply(variables, inputs, method='hidden')  # [B, T, D]
        b, t, d = h.shape
        n, pad = b * t, -(b * t) % chunk
        hs = jnp.pad(h.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
        ys = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)

        @jax.checkpoint
        def block(xs):
            return token_nll(model.apply(variables, xs[0], method='unembed'), xs[1])

        return jax.lax.map(block, (hs, ys)).reshape(-1)[:n].reshape(b, t)

    return chunked if chunk else whole


def chunked_next_token_loss(model: nn.Module, chunk: int) -> LossFn:
    """:func:`next_token_loss` with the token-chunked cross-entropy of :func:`token_nll_fn`
    (config model.ce_chunk >= 1): same value and gradient, one [chunk, V] logits block at a time.
    """
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f'chunk must be an int >= 1, got {chunk!r}')
    nll_fn = token_nll_fn(model, chunk)

    def loss_fn(variables, batch, rng):
        del rng
        tokens, w = batch['tokens'], batch['weight'].astype(jnp.float32)
        nll = nll_fn(variables, tokens[:, :-1], tokens[:, 1:])
        count = w.sum() * nll.shape[1]
        return (nll.sum(-1) * w).sum() / jnp.maximum(count, 1.0), count

    return loss_fn
