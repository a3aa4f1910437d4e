"""FedGen-Edge: FedAvg of LoRA adapters over a frozen backbone.

Frozen: {'params': theta_G} (never differentiated, never sent). Trainable: {'lora': A}, with A from
:func:`fedgen.lora.init` (B = 0, so round 0 starts exactly at the backbone). Clients upload
Delta A_k; the server averages them weighted by n_k and steps its optimizer (sgd(1.0) = FedAvg).
"""
import jax

from fedgen import lora, population
from fedgen.algorithms import fedavg, optim


def variables(backbone: dict, config, rng: jax.Array) -> tuple[dict, dict]:
    """(frozen, trainable) = ({'params': backbone}, {'lora': adapters})."""
    adapters = lora.init(rng, backbone, tuple(config.lora.targets), config.lora.rank)
    return {'params': backbone}, {'lora': adapters}


def make(config, loss_fn) -> fedavg.Algorithm:
    """The FedAvg engine with the config's optimizers, chunk, proximal weight and device mesh."""
    fed = config.fed
    return fedavg.make(loss_fn,
                       optim.build(fed.client_opt, fed.client_lr, 'fed.client_opt',
                                   'fed.client_lr'),
                       optim.build(fed.server_opt, fed.server_lr, 'fed.server_opt',
                                   'fed.server_lr'),
                       fed.client_chunk,
                       prox_mu=fed.prox_mu,
                       mesh=population.mesh_for(fed.num_devices))
