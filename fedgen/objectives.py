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


def chunked_next_token_loss(model: nn.Module, chunk: int) -> LossFn:
    """:func:`next_token_loss` without materializing the [B T, V] logits (config model.ce_chunk).

    The B T final hidden states (``model.hidden``) are cut into chunks of ``chunk`` tokens; each
    chunk's logits come from ``model.unembed`` inside ``jax.checkpoint`` under ``lax.map``, so the
    forward and the backward pass hold one [chunk, V] block at a time (the backward recomputes it).
    Same value and gradient as :func:`next_token_loss`.
    """
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f'model.ce_chunk must be an int >= 1, got {chunk!r}')

    def loss_fn(variables, batch, rng):
        del rng
        tokens, w = batch['tokens'], batch['weight'].astype(jnp.float32)
        h = model.apply(variables, tokens[:, :-1], method='hidden')  # [B, T, D]
        b, t, d = h.shape
        n, pad = b * t, -(b * t) % chunk
        hs = jnp.pad(h.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
        ys = jnp.pad(tokens[:, 1:].reshape(n), (0, pad)).reshape(-1, chunk)

        @jax.checkpoint
        def block(xs):
            return token_nll(model.apply(variables, xs[0], method='unembed'), xs[1])

        nll = jax.lax.map(block, (hs, ys)).reshape(-1)[:n].reshape(b, t)
        count = w.sum() * t
        return (nll.sum(-1) * w).sum() / jnp.maximum(count, 1.0), count

    return loss_fn
