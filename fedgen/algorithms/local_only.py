"""Local-only training: every client trains its own adapter alone; nothing is sent.

    v_k <- LocalUpdate_k(v_k)   for each sampled client, kept in state.clients [N, ...]

There is no global model, no aggregator and no server optimizer; a client that drops or whose
update is not finite keeps its v_k. The personalization baseline's lower bound on communication.
"""
import functools

import jax.numpy as jnp

from fedgen.fl import local_update as client
from fedgen.fl import client_state
from fedgen.fl import engine
from fedgen.fl import hparams
from fedgen.fl.algorithm import Algorithm, ServerState
from fedgen.privacy import dp as dp_lib


def make(p, loss_fn, mesh=None) -> Algorithm:
    """The local-only Algorithm of MethodParams ``p``."""
    update = client.make_local_update(loss_fn, p.client_tx)

    def init(trainable, rng):
        return ServerState(round=jnp.zeros((), jnp.int32),
                           trainable=trainable,
                           opt_state={},
                           rng=rng,
                           clients=client_state.tile(trainable, p.num_clients),
                           aux={})

    def client_phase(state, frozen, data):
        ids = data.client_ids
        data, fate = engine.draw_fates(state, data, p.faults)
        res = engine.run_clients(functools.partial(update, hp=hparams.client(data.hparams)),
                                 state,
                                 frozen,
                                 data,
                                 p.chunk,
                                 start=client_state.gather(state.clients, ids),
                                 mesh=mesh,
                                 active=(data.n_k > 0) & (fate.report > 0))
        finite = engine.all_finite(res.delta, ids.shape[0]).astype(jnp.float32)
        return engine.ClientOutput({}, res.delta, res.loss_sum, res.weight, fate.report, finite,
                                   dp_lib.client_norms(res.delta))

    def server_phase(state, data, out):
        ids, n_k = data.client_ids, data.n_k
        live = out.report * out.finite * (n_k > 0)
        metrics = engine.round_metrics(out, ids, n_k, live)
        clients = client_state.scatter_add(state.clients, ids, engine.zero_where(out.kept, live))
        return state.replace(round=state.round + 1, clients=clients), {**metrics, 'live': live}

    def apply(state, frozen, data):
        return server_phase(state, data, client_phase(state, frozen, data))

    nothing = lambda tree: {}  # noqa: E731
    return Algorithm(init,
                     apply,
                     nothing,
                     nothing,
                     lambda state: state.clients,
                     client_phase=client_phase,
                     server_phase=server_phase,
                     has_global=False)
