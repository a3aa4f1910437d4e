"""Federated methods: each is the one engine (:mod:`fedgen.engine`) with typed hyper-parameters.

| method        | trainable          | what differs (engine.Federation fields)                    |
|---------------|--------------------|------------------------------------------------------------|
| fedgen_edge   | LoRA adapters      | nothing: FedAvg of adapters over the frozen backbone       |
| fedavg_full   | every backbone leaf| nothing: full-model FedAvg (the uplink baseline)            |
| fedprox       | adapters (or full) | prox_mu > 0 (Li et al. 2020)                               |
| ditto         | adapters           | personal_lambda > 0: a personal model per client (Li 2021) |
| fedsa         | adapters           | local_leaves={'b'}: A shared, B local (Guo et al. 2024)    |
| local_only    | adapters           | keep_local: every client trains alone, nothing is sent     |
| centralized   | adapters           | pooled: one chain over the sampled clients' pooled data    |

FedAdam / FedYogi / FedAdagrad are any of these with that server optimizer. The LoRA
aggregation (``lora_aggregation``: avg_ab, exact_residual, svd_refactor, ffa, stack) and
heterogeneous client ranks (``client_ranks``) apply to the adapter methods that average (A, B).
"""
import dataclasses
from typing import Optional

import jax
import optax
from jax.sharding import Mesh

from flax import traverse_util

from fedgen import engine, lora, lora_aggregation
from fedgen.base import Algorithm

METHODS = ('fedgen_edge', 'fedavg_full', 'fedprox', 'ditto', 'fedsa', 'local_only', 'centralized')
PROX_TARGETS = ('lora', 'full')


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Adapters: rank r, scale alpha (W = W0 + (alpha/r) A B), target path rules or presets."""
    rank: int
    alpha: float
    targets: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class MethodParams:
    """Typed hyper-parameters of a method; the entry point builds them once from the config.

    name: one of METHODS (config ``fed.algorithm``); num_clients: N; chunk: clients per vmap;
    prox_mu: FedProx's mu (any method; fedprox requires > 0); prox_target: what fedprox trains;
    ditto_lambda: Ditto's lambda (> 0 for ditto); reducer: the server's reduction over uploads;
    aux_init(trainable): the reduction's initial server-side state; faults: simulated faults.
    """
    name: str
    num_clients: int
    client_tx: optax.GradientTransformation
    server_tx: optax.GradientTransformation
    lora: LoraSpec
    chunk: int = 1
    prox_mu: float = 0.0
    prox_target: str = 'lora'
    ditto_lambda: float = 0.0
    reducer: engine.Reducer = engine.weighted_mean_reducer
    aux_init: Optional[object] = None
    faults: engine.Faults = engine.Faults()
    lora_aggregation: str = 'avg_ab'
    residual_rank: Optional[int] = None
    client_ranks: Optional[tuple] = None

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f'fed.algorithm must be one of {list(METHODS)}, got {self.name!r}')
        if self.name == 'fedprox' and not self.prox_mu > 0:
            raise ValueError(f'fed.prox_mu must be > 0 for fedprox, got {self.prox_mu!r}')
        if self.prox_target not in PROX_TARGETS:
            raise ValueError(f'fed.prox_target must be one of {PROX_TARGETS}, got '
                             f'{self.prox_target!r}')
        if self.name == 'ditto' and not self.ditto_lambda > 0:
            raise ValueError(f'fed.ditto_lambda must be > 0 for ditto, got {self.ditto_lambda!r}')
        hetero = self.client_ranks is not None and len(set(self.client_ranks)) > 1
        algorithm = 'fedavg_full' if self.full_model else self.name
        lora_aggregation.validate(self.lora_aggregation,
                                  self.residual_rank,
                                  heterogeneous_ranks=hetero,
                                  algorithm=algorithm)
        if self.client_ranks is not None and self.name in ('ditto', 'fedsa'):
            raise ValueError(f'lora.client_ranks runs with fedgen_edge and fedprox (clients that '
                             f'start from the global adapter), not fed.algorithm={self.name!r}')

    @property
    def has_global(self) -> bool:
        """Whether the method trains a global model: FedSA's global B stays 0 (only A is
        shared) and local-only never averages, so neither has a model to evaluate globally."""
        return self.name not in ('fedsa', 'local_only')

    @property
    def full_model(self) -> bool:
        """Whether every backbone leaf is trainable (no adapters)."""
        return self.name == 'fedavg_full' or (self.name == 'fedprox' and self.prox_target == 'full')


def variables(p: MethodParams, backbone: dict, rng: jax.Array) -> tuple[dict, dict]:
    """(frozen, trainable): ({}, {'params': backbone}) for full-model methods, else
    ({'params': backbone}, {'lora': adapters}) with B = 0 (round 0 starts at the backbone)."""
    if p.full_model:
        return {}, {'params': backbone}
    adapters = lora.init(rng, backbone, p.lora.targets, p.lora.rank)
    return {'params': backbone}, {'lora': adapters}


def _frozen_a(tree):
    """optax.multi_transform labels for FFA-LoRA: every A leaf 'freeze', the rest 'train'."""
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({k: 'freeze' if k[-1] == 'a' else 'train' for k in flat})


def federation(p: MethodParams) -> engine.Federation:
    """The engine's hyper-parameters for method ``p.name``."""
    client_tx = p.client_tx
    if p.lora_aggregation == 'ffa':  # A stays at its init: its updates are set to zero
        client_tx = optax.multi_transform({
            'train': client_tx,
            'freeze': optax.set_to_zero()
        }, _frozen_a)
    lora_agg = None
    if not p.full_model and (p.lora_aggregation != 'avg_ab' or p.client_ranks is not None):
        lora_agg = lora_aggregation.LoraAggregation(p.lora_aggregation, p.lora.alpha,
                                                    p.residual_rank)
    common = dict(client_tx=client_tx,
                  server_tx=p.server_tx,
                  num_clients=p.num_clients,
                  chunk=p.chunk,
                  prox_mu=p.prox_mu,
                  reducer=p.reducer,
                  faults=p.faults,
                  lora_agg=lora_agg,
                  client_ranks=p.client_ranks)
    if p.aux_init is not None:
        common['aux_init'] = p.aux_init
    variant = {
        'ditto': dict(personal_lambda=p.ditto_lambda),
        'fedsa': dict(local_leaves=frozenset({'b'})),
        'local_only': dict(keep_local=True, server_tx=None, prox_mu=0.0),
        'centralized': dict(pooled=True, prox_mu=0.0),
    }.get(p.name, {})
    return engine.Federation(**{**common, **variant})


def make(p: MethodParams, loss_fn, mesh: Mesh | None = None) -> Algorithm:
    """The method's Algorithm for a task's loss; ``mesh`` shards the client axis."""
    return engine.make(federation(p), loss_fn, mesh)
