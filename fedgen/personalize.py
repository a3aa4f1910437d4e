"""Personalization: every client fine-tunes its own copy of the global trainable tree, in one map.

From the global tree w_G (e.g. {'lora': A_G}) each client k = 1..N runs E_p local epochs on its
local train split,

    w_k = LocalUpdate_k(w_G; E_p epochs)          (client.make_local_update, all N clients mapped)

and is evaluated on its local test split with both trees,

    L_k(w) = sum_i mean_i(w) weight_i / sum_i weight_i     (metrics.dataset_loss per client),

so the per-client gain is metric(L_k(w_G)) - metric(L_k(w_k)) (for text, PPL = exp(L)). The global
tree is only read, never changed. E_p = 0 skips training: w_k = w_G for every k, and the personal
metrics equal the global ones exactly (both go through the same stacked evaluation).
"""
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedgen import client, client_state, population
from fedgen.data import batching
from fedgen.metrics import dataset_loss

PyTree = Any
# The host sampling stream of personalization: a "round" id no training round ever reaches.
PERSONALIZE_ROUND = 2**31 - 1


class Personalized(NamedTuple):
    """personal: stacked trees [N, ...]; *_loss, test_weight, train_loss: [N] float arrays.

    test_weight is the number of loss units (tokens, images) in each local test split; a client
    with none has NaN losses."""
    personal: PyTree
    global_loss: np.ndarray
    personal_loss: np.ndarray
    test_weight: np.ndarray
    train_loss: np.ndarray


def pack_eval(examples: dict, client_indices: Sequence[np.ndarray], batch_size: int) -> dict:
    """Every client's examples once, as field -> [N, NB, B, ...] plus ``weight`` [N, NB, B].

    NB is the largest client's batch count; shorter clients (and empty ones) are padded with
    weight-0 examples, which no loss counts.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f'eval.batch_size must be an int >= 1, got {batch_size!r}')
    nb = max(1, max(-(-len(i) // batch_size) for i in client_indices))
    out = {k: [] for k in list(examples) + ['weight']}
    for idx in client_indices:
        idx = np.asarray(idx, np.int64)
        pos = np.arange(nb * batch_size)
        take = idx[np.minimum(pos, max(len(idx) - 1, 0))] if len(idx) else np.zeros_like(pos)
        for k, v in examples.items():
            out[k].append(v[take].reshape((nb, batch_size) + v.shape[1:]))
        out['weight'].append((pos < len(idx)).astype(np.float32).reshape(nb, batch_size))
    return {k: np.stack(v) for k, v in out.items()}


def evaluate_clients(loss_fn: Callable, frozen: PyTree, stacked: PyTree, batches: dict,
                     rng: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(loss [N], weight [N]): client k's dataset loss under {**frozen, **stacked[k]}.

    batches: field -> [N, NB, B, ...] (from :func:`pack_eval`). Every client uses the same key,
    so stochastic losses (diffusion) compare trees on identical noise. Jit it from the caller.
    """

    def one(shared, x):
        frz, key = shared
        return dataset_loss.dataset_loss(loss_fn, {**frz, **x['w']}, x['batches'], key)

    return population.map_clients(one, (frozen, rng), {'w': stacked, 'batches': batches}, chunk)


def finetune(loss_fn: Callable, tx: optax.GradientTransformation, frozen: PyTree, global_w: PyTree,
             data: batching.RoundData, rng: jax.Array, chunk: int) -> tuple[PyTree, jax.Array]:
    """(personal [N, ...], train loss [N]): every client's local update from ``global_w``.

    data: the RoundData of all N clients; client k's key is fold_in(rng, client_ids[k]). Only the
    final parameters leave the map (not deltas or optimizer states), to bound memory for large
    trainable trees (full-model FedAvg + fine-tuning).
    """
    update = client.make_local_update(loss_fn, tx)

    def one(shared, x):
        frz, w_g = shared
        res = update(frz, w_g, x['data'], x['rng'])
        return res.params, res.loss_sum / jnp.maximum(res.weight, 1.0)

    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(data.client_ids))
    per_client = {'data': {'batches': data.batches, 'mask': data.mask}, 'rng': keys}
    return population.map_clients(one, (frozen, global_w), per_client, chunk)


def personalize(loss_fn: Callable,
                tx: optax.GradientTransformation,
                frozen: PyTree,
                global_w: PyTree,
                pool: dict,
                client_train: Sequence[np.ndarray],
                client_test: Sequence[np.ndarray],
                *,
                epochs: int,
                batch_size: int,
                seed: int,
                chunk: int,
                eval_batch_size: int,
                max_steps: int = 0,
                personal: PyTree | None = None) -> Personalized:
    """Fine-tunes all N = len(client_train) clients for ``epochs`` and evaluates them.

    ``personal`` optionally gives ready personal trees [N, ...] (Ditto, FedSA, local-only keep
    them in their state); then no fine-tuning runs and ``epochs`` is ignored.
    """
    if not (isinstance(epochs, int) and epochs >= 0):
        raise ValueError(f'personalize.epochs must be an int >= 0, got {epochs!r}')
    if len(client_train) != len(client_test):
        raise ValueError('personalize: client_train and client_test must list the same clients')
    n = len(client_train)
    rng = jax.random.PRNGKey(seed)
    train_loss = np.full(n, np.nan, np.float32)
    if personal is None and epochs > 0:
        steps = batching.num_local_steps([len(i) for i in client_train], batch_size, epochs,
                                         max_steps)
        data = batching.pack_clients(pool, client_train, np.arange(n), seed, PERSONALIZE_ROUND,
                                     batch_size, epochs, steps, max_steps)
        personal, tl = _FINETUNE(loss_fn, tx, frozen, global_w, data, jax.random.fold_in(rng, 1),
                                 chunk)
        train_loss = np.asarray(tl)
    elif personal is None:
        personal = client_state.tile(global_w, n)
    batches = pack_eval(pool, client_test, eval_batch_size)
    ev = _EVALUATE
    key = jax.random.fold_in(rng, 2)
    g_loss, weight = ev(loss_fn, frozen, client_state.tile(global_w, n), batches, key, chunk)
    p_loss, _ = ev(loss_fn, frozen, personal, batches, key, chunk)
    weight = np.asarray(weight)
    empty = np.where(weight > 0, 1.0, np.nan).astype(np.float32)
    return Personalized(personal,
                        np.asarray(g_loss) * empty,
                        np.asarray(p_loss) * empty, weight, train_loss)


# Jitted once per (loss_fn, tx, chunk): repeated calls (compare runs, tests) reuse the compile.
_FINETUNE = jax.jit(finetune, static_argnums=(0, 1, 6))
_EVALUATE = jax.jit(evaluate_clients, static_argnums=(0, 5))


def gain_summary(global_metric: np.ndarray, personal_metric: np.ndarray) -> dict:
    """Per-client gain g_k = global_k - personal_k (lower-is-better metrics, so g > 0 helps).

    Over clients with a finite metric: share improved (g > 0), median, 10th and 90th percentile
    gain, and the means of both metrics.
    """
    g, p = np.asarray(global_metric, np.float64), np.asarray(personal_metric, np.float64)
    ok = np.isfinite(g) & np.isfinite(p)
    gain = g[ok] - p[ok]
    if gain.size == 0:
        raise ValueError('personalize: no client has a local test example '
                         '(data.partition.local_test_fraction)')
    return {
        'clients': int(ok.sum()),
        'share_improved': float((gain > 0).mean()),
        'median_gain': float(np.median(gain)),
        'p10_gain': float(np.percentile(gain, 10)),
        'p90_gain': float(np.percentile(gain, 90)),
        'mean_global': float(g[ok].mean()),
        'mean_personal': float(p[ok].mean())
    }
