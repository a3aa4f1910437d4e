"""FedAvg over any aggregator (FedGen-Edge, full-model FedAvg, FedProx); FedSA is this with B kept.

    client k:  w_k = LocalUpdate_k(start_k) on L_k(w) + (mu/2)||w - w_G^t||^2   (mu = 0: FedAvg)
               u_k = upload(w_k - start_k)
    server:    Delta = aggregator({u_k}, n_k used_k);  w_G^{t+1} = ServerOpt(w_G^t, -Delta)

``local_leaves`` (FedSA-LoRA: {'b'}): those leaves stay on the client, kept in state.clients
[N, ...], never uploaded or broadcast; the global copy gets a zero pseudo-update. Heterogeneous
ranks (``p.client_ranks``): client k starts from the global adapter with A's columns and B's rows
beyond r_k zeroed (a rank mask), so they get exactly zero gradient and one program serves every
rank; the aggregator (fedgen.aggregators.hetlora) averages each rank slice over its owners.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from fedgen.fl import local_update as client
from fedgen.fl import client_state
from fedgen.fl import engine
from fedgen.fl import hparams
from fedgen.aggregators import lora_math as lora_aggregation
from fedgen.lora import ranks as lora_ranks
from fedgen.aggregators import RoundContext
from fedgen.fl.algorithm import Algorithm, ServerState
from fedgen.privacy import dp as dp_lib


def freeze_leaves(tx: optax.GradientTransformation, names: tuple) -> optax.GradientTransformation:
    """``tx`` with the updates of every leaf whose last key is in ``names`` set to zero (FFA-LoRA's
    A stays at its init; weight decay cannot move it either)."""
    if not names:
        return tx

    def labels(tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: 'freeze' if getattr(path[-1], 'key', None) in names else 'train', tree)

    return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)


def make(p, loss_fn, mesh=None, local_leaves: frozenset = frozenset()) -> Algorithm:
    """The FedAvg-family Algorithm of MethodParams ``p`` for a task's ``loss_fn``."""
    agg = p.aggregator
    update = client.make_local_update(loss_fn, freeze_leaves(p.client_tx, agg.client_frozen),
                                      p.prox_mu)
    ranks = None if p.client_ranks is None else jnp.asarray(p.client_ranks, jnp.int32)

    def shared_of(tree):
        return client_state.split(tree, local_leaves)[0] if local_leaves else tree

    def upload(delta):
        return agg.upload(shared_of(delta))

    def effective_frozen(state, frozen):
        if agg.frozen_delta is None:
            return frozen
        delta = agg.frozen_delta(state.aux['agg'])
        return {**frozen, 'params': lora_aggregation.apply_delta(frozen['params'], delta)}

    def init(trainable, rng) -> ServerState:
        kept = {}
        if local_leaves:
            kept = client_state.tile(client_state.split(trainable, local_leaves)[1], p.num_clients)
        return ServerState(round=jnp.zeros((), jnp.int32),
                           trainable=trainable,
                           opt_state=p.server_tx.init(trainable),
                           rng=rng,
                           clients=kept,
                           aux={'agg': agg.init(trainable)})

    def rank_mask(state, ids):
        if ranks is None:
            return None
        r_max = lora_ranks.adapter_rank(state.trainable['lora'], section='lora.')
        return lora_ranks.rank_mask(ranks[ids], r_max)

    def starts(state, ids, mask):
        """Per-client starting trees [C, ...], or None when every client starts at w_G."""
        c = ids.shape[0]
        if local_leaves:
            return client_state.join(client_state.tile(shared_of(state.trainable), c),
                                     client_state.gather(state.clients, ids))
        if mask is not None:
            tiled = client_state.tile(state.trainable, c)
            return {**tiled, 'lora': lora_ranks.mask_adapters(tiled['lora'], mask)}
        return None

    def client_phase(state, frozen, data) -> engine.ClientOutput:
        ids = data.client_ids
        data, fate = engine.draw_fates(state, data, p.faults)
        mask = rank_mask(state, ids)
        res = engine.run_clients(functools.partial(update, hp=hparams.client(data.hparams)),
                                 state,
                                 effective_frozen(state, frozen),
                                 data,
                                 p.chunk,
                                 start=starts(state, ids, mask),
                                 mesh=mesh,
                                 anchor_is_start=mask is not None,
                                 active=(data.n_k > 0) & (fate.report > 0))
        sent = engine.attack(state, upload(res.delta), ids, p.faults, p.num_clients)
        kept = client_state.split(res.delta, local_leaves)[1] if local_leaves else {}
        c = ids.shape[0]
        finite = engine.all_finite(sent, c) & engine.all_finite(kept, c)
        return engine.ClientOutput(sent, kept, res.loss_sum, res.weight, fate.report,
                                   finite.astype(jnp.float32), dp_lib.client_norms(res.delta))

    def server_phase(state, data, out):
        ids, n_k = data.client_ids, data.n_k
        live = out.report * out.finite * (n_k > 0)
        metrics = engine.round_metrics(out, ids, n_k, live)
        ctx = RoundContext(ids, (n_k > 0).astype(jnp.float32), live, state.trainable,
                           rank_mask(state, ids))
        new, extra = engine.aggregate_and_step(state, agg, engine.zero_where(out.sent, live),
                                               n_k * live, ctx, p.server_tx,
                                               hparams.server(data.hparams))
        if local_leaves:
            new = new.replace(clients=client_state.scatter_add(state.clients, ids,
                                                               engine.zero_where(out.kept, live)))
        metrics = engine.publish({**metrics, **extra}, agg, p.log_diagnostics)
        return new.replace(round=state.round + 1), {**metrics, 'live': live}

    def apply(state, frozen, data):
        return server_phase(state, data, client_phase(state, frozen, data))

    def personal(state):
        n = jax.tree.leaves(state.clients)[0].shape[0]
        return client_state.join(client_state.tile(shared_of(state.trainable), n), state.clients)

    return Algorithm(init,
                     apply,
                     upload,
                     upload,
                     personal if local_leaves else None,
                     effective_frozen,
                     client_phase,
                     server_phase,
                     agg,
                     has_global=not local_leaves)
