"""The one place where a run's ml_collections config becomes typed hyper-parameters.

Library code never reads a ConfigDict; every entry point (train, personalize, compare, sweep)
calls these translators once and hands the typed values down.
"""
import dataclasses
import typing

import jax
from jax.sharding import Mesh

import numpy as np

from fedgen import algorithms, engine, fates, lora_ranks, population, privacy, robust, tasks
from fedgen.data import batching
from fedgen.privacy import accounting
from fedgen.privacy import dp as dp_lib
from fedgen.privacy import sampling as dp_sampling
from fedgen.privacy import secagg
from fedgen.algorithms import optim


def build(cls, section, path: str = ''):
    """An instance of the frozen dataclass ``cls`` from a config section (a mapping).

    Fields that are dataclasses are built recursively from the sub-section of the same name;
    lists become tuples. The dataclass names what it reads: extra config fields are other
    components' (the config itself is locked, so a typo fails there); a missing field is a
    one-line ValueError."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        name = f'{path}{f.name}'
        if f.name not in section:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f'config has no field {name} (needed by {cls.__qualname__})')
            continue
        value = section[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            value = build(hints[f.name], value, f'{name}.')
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def task_settings(config):
    """The task's typed Settings (fedgen.tasks.<config.task>.Settings) from the config."""
    return build(tasks.get(config.task).Settings, config.to_dict())


def prepare_task(config) -> tasks.Task:
    """The task of ``config``, ready to train."""
    return tasks.get(config.task).prepare(task_settings(config))


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


def dp_enabled(config) -> bool:
    """DP-FedAvg is on when fed.dp.clip_norm > 0."""
    return config.fed.dp.clip_norm != 0


def dp_delta(config) -> float:
    """fed.dp.delta, or 1/N when it is 0."""
    return config.fed.dp.delta or 1.0 / config.fed.num_clients


def sampling_rate(config) -> float:
    """q = C / N, the expected share of clients in a round."""
    return round_clients(config) / config.fed.num_clients


def dp_capacity(config) -> int:
    """Padded clients per round: C for fixed-size sampling; for Poisson sampling the smallest c
    with T * P(Binomial(N, q) > c) <= 1e-6."""
    d, fed = config.fed.dp, config.fed
    if not dp_enabled(config) or d.sampling == 'fixed':
        return round_clients(config)
    return dp_sampling.poisson_capacity(fed.num_clients, sampling_rate(config), fed.rounds)


def noise_multiplier(config) -> float:
    """z: fed.dp.noise_multiplier, or calibrated to fed.dp.target_epsilon over fed.rounds."""
    d, fed = config.fed.dp, config.fed
    if not d.target_epsilon:
        return float(d.noise_multiplier)
    return accounting.calibrate_noise(d.target_epsilon, sampling_rate(config), fed.rounds,
                                      dp_delta(config), d.accountant, d.sampling, fed.num_clients)


def dp_params(config):
    """(DPParams, SecAggParams or None) of the run; validated before any compute."""
    d, fed = config.fed.dp, config.fed
    if not (isinstance(d.clip_norm, (int, float)) and d.clip_norm > 0):
        raise ValueError(f'fed.dp.clip_norm must be > 0 (0 = DP off), got {d.clip_norm!r}')
    if fed.aggregator != 'mean':
        raise ValueError(f"fed.dp needs fed.aggregator='mean' (the private mean), got "
                         f'{fed.aggregator!r}')
    delta = dp_delta(config)
    accounting.check(delta, d.accountant, d.sampling, sampling_rate(config), fed.num_clients)
    params = dp_lib.make_params(d.clip_norm, noise_multiplier(config), round_clients(config),
                                d.adaptive, d.target_quantile, d.clip_lr, d.count_stddev)
    sec = None
    if fed.secagg.enabled:
        sec = secagg.make_params(d.clip_norm, dp_capacity(config), fed.secagg.bits,
                                 fed.secagg.scale)
    return params, sec


def reducer(config) -> tuple:
    """(reduce, aux_init): the server's reduction over the uploads. DP-FedAvg (+ SecAgg) when
    fed.dp.clip_norm > 0, else ``fed.aggregator`` with ``fed.robust.*``."""
    fed = config.fed
    if fed.secagg.enabled and not dp_enabled(config):
        raise ValueError('fed.secagg.enabled needs clipping (fed.dp.clip_norm > 0): the '
                         'quantization range comes from the clip norm')
    if dp_enabled(config):
        params, sec = dp_params(config)
        return privacy.reducer(params, sec), privacy.aux_init(params)
    name, hp = fed.aggregator, dict(fed.robust.to_dict())
    robust.check(name, round_clients(config), fed.attack.fraction, **hp)
    if name == 'mean':
        return engine.weighted_mean_reducer, None

    def reduce(uploads, weights, key, aux, info):
        del key, info
        out, metrics = robust.reduce(name, uploads, weights, **hp)
        return out, aux, {k: v for k, v in metrics.items() if k != 'selected'}

    return reduce, None


def client_ranks(config) -> tuple | None:
    """Every client's LoRA rank from lora.client_ranks ('' = all lora.rank)."""
    spec = config.lora.client_ranks
    if spec in ('', None) or spec == ():
        return None
    ranks = lora_ranks.client_ranks(spec, config.fed.num_clients, config.lora.rank, config.seed)
    return tuple(int(r) for r in ranks)


def sample_round(config, rnd: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(client ids [C_pad], present [C_pad] or None): this round's sampled clients, a pure
    function of (seed, round). Poisson sampling (DP) pads to a fixed capacity; padding slots are
    marked absent and carry no data (batching.drop_absent)."""
    fed = config.fed
    if dp_enabled(config) and fed.dp.sampling == 'poisson':
        return dp_sampling.poisson_clients(config.seed, rnd, fed.num_clients, sampling_rate(config),
                                           dp_capacity(config))
    return batching.sample_clients(config.seed, rnd, fed.num_clients, round_clients(config)), None


def method_params(config, chunk: int | None = None) -> algorithms.MethodParams:
    """MethodParams from ``config.fed`` and ``config.lora`` (``chunk`` overrides the config's)."""
    fed = config.fed
    reduce, aux_init = reducer(config)
    server = optim.ServerOptSpec(fed.server_opt, fed.server_lr, fed.server_b1, fed.server_b2,
                                 fed.server_tau)
    return algorithms.MethodParams(name=fed.algorithm,
                                   num_clients=fed.num_clients,
                                   client_tx=optim.build(fed.client_opt, fed.client_lr,
                                                         'fed.client_opt', 'fed.client_lr'),
                                   server_tx=optim.build_server(server),
                                   lora=lora_spec(config),
                                   chunk=fed.client_chunk if chunk is None else chunk,
                                   prox_mu=float(fed.prox_mu),
                                   prox_target=fed.prox_target,
                                   ditto_lambda=float(fed.ditto_lambda),
                                   reducer=reduce,
                                   aux_init=aux_init,
                                   faults=faults(config),
                                   lora_aggregation=fed.lora_aggregation,
                                   residual_rank=fed.residual_rank,
                                   client_ranks=client_ranks(config))


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


def accountant(config) -> accounting.RoundAccountant | None:
    """The run's privacy accountant (epsilon after t rounds at delta), or None without DP."""
    if not dp_enabled(config):
        return None
    d, fed = config.fed.dp, config.fed
    return accounting.RoundAccountant(sampling_rate(config), noise_multiplier(config),
                                      dp_delta(config), d.accountant, d.sampling, fed.num_clients)


def privacy_notes(config) -> list[str]:
    """What the run's privacy settings mean, one line each, for the start of the log."""
    fed = config.fed
    if not dp_enabled(config):
        return []
    d = fed.dp
    z = noise_multiplier(config)
    notes = [
        f'DP-FedAvg: clip {d.clip_norm} (adaptive: {d.adaptive}), noise multiplier z={z:.4g}, '
        f'{d.sampling} sampling q={sampling_rate(config):.4g}, delta={dp_delta(config):.3g}, '
        f'{d.accountant} accountant; uniform client weights (n_k would break the sensitivity)',
        'trust: ' + ('SecAgg (pairwise masks, the server sees only the sum) plus central noise '
                     'added after unmasking: the server is trusted to add the noise'
                     if fed.secagg.enabled else 'central DP: the server sees every clipped '
                     'update and is trusted to add the noise')
    ]
    if not (fed.server_opt == 'sgd' and fed.server_lr == 1.0):
        notes.append(f'server optimizer {fed.server_opt} (lr {fed.server_lr}): the accounting '
                     'covers the noisy aggregate; the server step is post-processing')
    if fed.algorithm == 'ditto':
        notes.append('ditto: the personal models never leave the clients; only the global '
                     'updates are private')
    if fed.algorithm in ('fedavg_full', ) or (fed.algorithm == 'fedprox'
                                              and fed.prox_target == 'full'):
        notes.append('full-model updates are private too, but far larger: the same noise '
                     'std per coordinate over every weight')
    if fed.algorithm in ('local_only', 'centralized'):
        raise ValueError(f'fed.dp cannot make fed.algorithm={fed.algorithm!r} private: it '
                         'uploads no model updates (local_only) or pools raw data (centralized)')
    return notes


def client_bytes(config, alg, trainable: dict) -> tuple:
    """(up, down) bytes per client: plain ints, or [N] arrays when clients differ (true ranks
    r_k) or the protocol adds to them (the frozen delta of FedEx-LoRA / FLoRA, SecAgg)."""
    from fedgen import comm, lora_aggregation
    fed = config.fed
    cost = comm.round_cost(alg, trainable, 1)
    up, down = cost.up_per_client, cost.down_per_client
    ranks = client_ranks(config)
    method = fed.lora_aggregation
    if 'lora' in trainable and (ranks is not None or method != 'avg_ab'):
        r = np.asarray(ranks if ranks is not None else [config.lora.rank] * fed.num_clients)
        up = lora_aggregation.upload_bytes(method, trainable['lora'], r)
        down = lora_aggregation.download_bytes(method,
                                               trainable['lora'],
                                               r,
                                               residual_rank=fed.residual_rank,
                                               round_clients=fed.clients_per_round)['total']
    if dp_enabled(config) and fed.secagg.enabled:
        up = secagg.protocol_bytes(comm.num_params(alg.upload(trainable)), dp_capacity(config),
                                   fed.secagg.bits)['total']
    return up, down
