"""Ditto (Li et al. 2021): FedAvg's global model plus a personal model per client.

Each sampled client k also takes personal steps from its own v_k, regularized toward the
pre-round global model:

    v_k <- LocalUpdate_k(v_k) on L_k(v) + (lambda / 2) ||v - w_G^t||^2

The personal models never leave the clients (state.clients [N, ...]); a client that drops or whose
personal update is not finite keeps its v_k. The global part is :mod:`fedavg` unchanged.
"""
import functools

import jax
import jax.numpy as jnp

from fedgen.fl import local_update as client
from fedgen.fl import client_state
from fedgen.fl import engine
from fedgen.fl import hparams
from fedgen.algorithms import fedavg
from fedgen.fl.algorithm import Algorithm


def make(p, loss_fn, mesh=None) -> Algorithm:
    """Ditto with lambda = ``p.ditto_lambda`` over FedAvg with ``p.aggregator``."""
    glob = fedavg.make(p, loss_fn, mesh)
    personal_update = client.make_local_update(loss_fn, p.client_tx, p.ditto_lambda)

    def init(trainable, rng):
        state = glob.init(trainable, rng)
        return state.replace(clients=client_state.tile(trainable, p.num_clients))

    def client_phase(state, frozen, data):
        out = glob.client_phase(state, frozen, data)
        cut, fate = engine.draw_fates(state, data, p.faults)  # the fates of the global steps
        # Personal steps draw their own keys; their anchor is the pre-round w_G^t.
        res = engine.run_clients(functools.partial(personal_update,
                                                   hp=hparams.client(data.hparams, proximal=False)),
                                 state.replace(rng=jax.random.fold_in(state.rng, 1)),
                                 glob.effective_frozen(state, frozen),
                                 cut,
                                 p.chunk,
                                 start=client_state.gather(state.clients, data.client_ids),
                                 mesh=mesh,
                                 active=(data.n_k > 0) & (fate.report > 0))
        ok = engine.all_finite(res.delta, data.client_ids.shape[0]).astype(jnp.float32)
        extra = {'personal_loss_sum': res.loss_sum, 'personal_weight': res.weight, 'ok': ok}
        return out.replace(kept=engine.zero_where(res.delta, ok), extra=extra)

    def server_phase(state, data, out):
        new, metrics = glob.server_phase(state, data, out)
        keep = metrics['live'] * out.extra['ok']
        clients = client_state.scatter_add(state.clients, data.client_ids,
                                           engine.zero_where(out.kept, keep))
        used = keep > 0  # skipped (absent) clients' rows are zeros: average over the used ones
        loss = jnp.where(used, out.extra['personal_loss_sum'], 0.0).sum() / jnp.maximum(
            jnp.where(used, out.extra['personal_weight'], 0.0).sum(), 1.0)
        extra = engine.publish({'personal_train_loss': loss}, p.aggregator, p.log_diagnostics)
        return new.replace(clients=clients), {**metrics, **extra}

    def apply(state, frozen, data):
        return server_phase(state, data, client_phase(state, frozen, data))

    return glob._replace(init=init,
                         apply=apply,
                         personal=lambda state: state.clients,
                         client_phase=client_phase,
                         server_phase=server_phase)
