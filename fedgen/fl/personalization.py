"""Personalization: every client's own model, evaluated beside the same references for every method.

Three models per client k, each evaluated on k's local test split (all N clients in one map):

    backbone   {'params': theta_G}                 the frozen backbone alone (one reference for
                                                   every method: LoRA with B = 0 equals it)
    global     {**frozen, **w_G}                   the method's global model; n/a for methods
                                                   with none (FedSA keeps B = 0 globally,
                                                   local-only never averages)
    personal   {**frozen, **v_k}                   the method's kept per-client tree (Ditto, FedSA,
                                                   local-only), else w_G fine-tuned by client k
                                                   for E_p local epochs (client.make_local_update)

with the dataset loss L_k(w) = sum_i mean_i(w) weight_i / sum_i weight_i (metrics.dataset_loss).
The gains are metric(L_k(reference)) - metric(L_k(v_k)) for reference in (global, backbone)
(lower-is-better metrics, so a gain > 0 helps; for text the metric is PPL = exp(L)). Fine-tuning
only reads w_G. E_p = 0 with no kept trees gives v_k = w_G, and the personal metrics equal the
global ones exactly (both go through the same stacked evaluation). A client never trained keeps
its initial tree; :func:`summary` leaves such clients out of the shares of methods that keep trees.
"""
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedgen.fl import local_update as client
from fedgen.fl import client_state
from fedgen.fl import mesh as population
from fedgen.data import batching
from fedgen.metrics import dataset_loss

PyTree = Any
# The host sampling stream of personalization: a "round" id no training round ever reaches.
PERSONALIZE_ROUND = 2**31 - 1


class Personalized(NamedTuple):
    """personal: stacked trees [N, ...]; *_loss, test_weight, train_loss: [N] float arrays.

    test_weight is the number of loss units (tokens, images) in each local test split; a client
    with none has NaN losses; global_loss is NaN everywhere for a method with no global model;
    train_loss is NaN where no fine-tuning ran; finetuned: whether the personal trees are
    fine-tuned copies of w_G (False: kept trees, or E_p = 0)."""
    personal: PyTree
    backbone_loss: np.ndarray
    global_loss: np.ndarray
    personal_loss: np.ndarray
    test_weight: np.ndarray
    train_loss: np.ndarray
    finetuned: bool


def pack_eval(examples: dict, client_indices: Sequence[np.ndarray], batch_size: int) -> dict:
    """Every client's examples once, as field -> [N, NB, B, ...] plus ``weight`` [N, NB, B].

    NB is the largest client's batch count; shorter clients (and empty ones) are padded with
    weight-0 examples, which no loss counts.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f'batch_size must be an int >= 1, got {batch_size!r}')
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
                personal: PyTree | None = None,
                backbone: PyTree | None = None,
                has_global: bool = True,
                clients: Sequence[int] | None = None) -> Personalized:
    """Builds every client's personal tree and evaluates backbone, global and personal models.

    ``personal``: the method's kept per-client trees [N, ...] (Ditto, FedSA, local-only); then no
    fine-tuning runs and ``epochs`` is ignored. Otherwise the clients fine-tune w_G = ``global_w``
    for ``epochs``. ``backbone``: the backbone's variables alone ({'params': theta_G}; default
    ``frozen``). ``has_global`` False: the method has no global model (global_loss is NaN) and must
    give ``personal``. ``clients``: the client ids to personalize, n of them (default all N =
    len(client_train)); every output row i belongs to client clients[i], and a client's row is the
    same as in the run over all N (its batches and key follow its id, not its position).
    """
    if not (isinstance(epochs, int) and epochs >= 0):
        raise ValueError(f'epochs must be an int >= 0, got {epochs!r}')
    if len(client_train) != len(client_test):
        raise ValueError('personalize: client_train and client_test must list the same clients')
    if not has_global and personal is None:
        raise ValueError('personalize: a method with no global model needs its kept personal '
                         'trees (there is nothing to fine-tune)')
    ids = np.arange(len(client_train)) if clients is None else np.asarray(clients, np.int64)
    if ids.ndim != 1 or len(ids) == 0 or len(set(ids.tolist())) != len(ids) or ids.min() < 0 \
            or ids.max() >= len(client_train):
        raise ValueError(f'personalize: clients must be distinct ids in [0, {len(client_train)}), '
                         f'got {clients!r}')
    n = len(ids)
    if personal is not None and clients is not None:
        personal = jax.tree.map(lambda x: x[ids], personal)
    rng = jax.random.PRNGKey(seed)
    train_loss = np.full(n, np.nan, np.float32)
    finetuned = personal is None and epochs > 0
    if finetuned:
        steps = batching.num_local_steps([len(i) for i in client_train], batch_size, epochs,
                                         max_steps)
        data = batching.pack_clients(pool, client_train, ids, seed, PERSONALIZE_ROUND, batch_size,
                                     epochs, steps, max_steps)
        personal, tl = _FINETUNE(loss_fn, tx, frozen, global_w, data, jax.random.fold_in(rng, 1),
                                 chunk)
        train_loss = np.asarray(tl)
    elif personal is None:
        personal = client_state.tile(global_w, n)
    batches = pack_eval(pool, [client_test[k] for k in ids], eval_batch_size)
    key = jax.random.fold_in(rng, 2)  # the same noise for every model (diffusion losses)
    bb = frozen if backbone is None else backbone
    b_loss, weight = _EVALUATE(loss_fn, bb, {}, batches, key, chunk)
    p_loss, _ = _EVALUATE(loss_fn, frozen, personal, batches, key, chunk)
    if has_global:
        g_loss = _EVALUATE(loss_fn, frozen, client_state.tile(global_w, n), batches, key, chunk)[0]
    else:
        g_loss = np.full(n, np.nan, np.float32)
    weight = np.asarray(weight)
    empty = np.where(weight > 0, 1.0, np.nan).astype(np.float32)
    return Personalized(personal,
                        np.asarray(b_loss) * empty,
                        np.asarray(g_loss) * empty,
                        np.asarray(p_loss) * empty, weight, train_loss, finetuned)


def moved_rows(clients: PyTree, initial: PyTree) -> np.ndarray:
    """[N] bool: row k of some [N, ...] leaf differs from its initial value (client k trained)."""
    rows = [
        np.asarray(jnp.any((x != y).reshape(x.shape[0], -1), axis=1))
        for x, y in zip(jax.tree.leaves(clients), jax.tree.leaves(initial))
    ]
    return np.any(np.stack(rows), axis=0) if rows else np.zeros(0, bool)


# Jitted once per (loss_fn, tx, chunk): repeated calls (compare runs, tests) reuse the compile.
_FINETUNE = jax.jit(finetune, static_argnums=(0, 1, 6))
_EVALUATE = jax.jit(evaluate_clients, static_argnums=(0, 5))


def gain_summary(reference: np.ndarray,
                 personal: np.ndarray,
                 include: np.ndarray | None = None) -> dict:
    """Per-client gain g_k = reference_k - personal_k (lower-is-better metrics, so g > 0 helps).

    Over the clients with both metrics finite (and ``include``-d, when given): their count, the
    share improved (g > 0), the median, 10th and 90th percentile gain, and both means.
    """
    r, p = np.asarray(reference, np.float64), np.asarray(personal, np.float64)
    ok = np.isfinite(r) & np.isfinite(p)
    if include is not None:
        ok &= np.asarray(include, bool)
    gain = r[ok] - p[ok]
    if gain.size == 0:
        raise ValueError('personalize: no client has a local test example to compare')
    return {
        'clients': int(ok.sum()),
        'share_improved': float((gain > 0).mean()),
        'median_gain': float(np.median(gain)),
        'p10_gain': float(np.percentile(gain, 10)),
        'p90_gain': float(np.percentile(gain, 90)),
        'mean_reference': float(r[ok].mean()),
        'mean_personal': float(p[ok].mean())
    }


def summary(metric: Callable[[np.ndarray], np.ndarray], res: Personalized, trained: np.ndarray,
            kept: bool, epochs: int) -> dict:
    """The columns every method reports, each defined once (see the module docstring).

    metric: mean loss -> the client metric; trained [N]: the client's data trained its model in
    at least one round; kept: the personal trees are the method's own (then untrained clients,
    which still hold the initial tree, are left out of the shares). Keys that do not apply are
    None: ``vs_global`` without a global model, ``finetune_epochs`` without fine-tuning.
    """
    b, g, p = metric(res.backbone_loss), metric(res.global_loss), metric(res.personal_loss)
    include = np.asarray(trained, bool) if kept else None
    has_global = bool(np.isfinite(g).any())
    tested = np.isfinite(p)
    return {
        'personal_source': 'kept' if kept else ('finetuned' if res.finetuned else 'global'),
        'finetune_epochs': epochs if res.finetuned else None,
        'has_global': has_global,
        'clients_tested': int(tested.sum()),
        'clients_trained': int((tested & np.asarray(trained, bool)).sum()),
        'shares_over': 'trained clients' if kept else 'all clients',
        'mean_backbone': float(np.nanmean(b)),
        'mean_global': float(np.nanmean(g)) if has_global else None,
        'mean_personal': float(np.nanmean(p)),
        'vs_global': gain_summary(g, p, include) if has_global else None,
        'vs_backbone': gain_summary(b, p, include)
    }
