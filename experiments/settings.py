"""The one place where a run's ml_collections config becomes typed hyper-parameters.

Library code never reads a ConfigDict; every entry point (train, personalize, compare, sweep)
calls these translators once and hands the typed values down.
"""
import jax
from jax.sharding import Mesh

from fedgen import algorithms, engine, fates, population, robust
from fedgen.algorithms import optim


def lora_spec(config) -> algorithms.LoraSpec:
    lo = config.lora
    targets = (lo.targets, ) if isinstance(lo.targets, str) else tuple(lo.targets)
    return algorithms.LoraSpec(rank=lo.rank, alpha=float(lo.alpha), targets=targets)


def faults(config) -> engine.Faults:
    """Simulated dropouts, stragglers and attackers from ``config.fed``."""
    fed = config.fed
    fates.check_rates(fed.dropout_rate, fed.straggler_rate, fed.straggler_min_frac, fed.over_select)
    a = fed.attack
    return engine.Faults(dropout=float(fed.dropout_rate),
                         straggler=float(fed.straggler_rate),
                         straggler_min_frac=float(fed.straggler_min_frac),
                         attack=a.kind,
                         attack_fraction=float(a.fraction),
                         attack_scale=float(a.scale),
                         attack_noise_norm=float(a.noise_norm),
                         attack_seed=config.seed)


def round_clients(config) -> int:
    """Clients sampled per round: ceil(C (1 + fed.over_select)), so that about C report."""
    return fates.over_select(config.fed.clients_per_round, config.fed.over_select)


def reducer(config) -> engine.Reducer:
    """The server's reduction over the uploads: ``fed.aggregator`` with ``fed.robust.*``."""
    fed = config.fed
    name, hp = fed.aggregator, dict(fed.robust.to_dict())
    robust.check(name, round_clients(config), fed.attack.fraction, **hp)
    if name == 'mean':
        return engine.weighted_mean_reducer

    def reduce(uploads, weights, key, aux):
        del key
        out, metrics = robust.reduce(name, uploads, weights, **hp)
        return out, aux, {k: v for k, v in metrics.items() if k != 'selected'}

    return reduce


def method_params(config, chunk: int | None = None) -> algorithms.MethodParams:
    """MethodParams from ``config.fed`` and ``config.lora`` (``chunk`` overrides the config's)."""
    fed = config.fed
    return algorithms.MethodParams(name=fed.algorithm,
                                   num_clients=fed.num_clients,
                                   client_tx=optim.build(fed.client_opt, fed.client_lr,
                                                         'fed.client_opt', 'fed.client_lr'),
                                   server_tx=optim.build(fed.server_opt, fed.server_lr,
                                                         'fed.server_opt', 'fed.server_lr'),
                                   lora=lora_spec(config),
                                   chunk=fed.client_chunk if chunk is None else chunk,
                                   prox_mu=float(fed.prox_mu),
                                   prox_target=fed.prox_target,
                                   ditto_lambda=float(fed.ditto_lambda),
                                   reducer=reducer(config),
                                   faults=faults(config))


def mesh(config) -> Mesh | None:
    """The client mesh of ``fed.num_devices`` (0 = every device; None for one device)."""
    return population.mesh_for(config.fed.num_devices)


def check_schedule(config) -> None:
    """One-line errors for the loop's own fields (before any compute)."""
    if not (isinstance(config.fed.rounds, int) and config.fed.rounds >= 0):
        raise ValueError(f'fed.rounds must be an int >= 0, got {config.fed.rounds!r}')
    if not (isinstance(config.eval.every, int) and config.eval.every >= 1):
        raise ValueError(f'eval.every must be an int >= 1, got {config.eval.every!r}')


def preflight(config, task) -> algorithms.MethodParams:
    """Checks the method, optimizers and LoRA targets/rank on abstract shapes (no compute)."""
    check_schedule(config)
    p = method_params(config)
    abstract = task.backbone_shapes()
    jax.eval_shape(lambda b, r: algorithms.variables(p, b, r), abstract, jax.random.PRNGKey(0))
    return p
