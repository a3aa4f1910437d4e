"""Every pair of the run's switches, and every dp x secagg x X triple, either runs two rounds doing
what it says or is refused before any data is read, with one line naming both fields.

Switches: method (8), fed.aggregator (6), fed.lora_aggregation (5), lora.client_ranks, fed.dp,
fed.secagg, fed.ema_decay and fed.server_opt (4). The expected refusals are the table below (the
same table is in docs/privacy.md, docs/robustness.md and docs/lora_aggregation.md). For every DP
combination that runs, noise multiplier 0 and 1e4 give different adapters, the huge one moves the
global adapter far beyond what clipped updates could (noise-dominated), and epsilon is reported
only where noise was added.
"""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import ptb_fedgen_edge
from experiments import compare
from experiments import translate
from fedgen import algorithms
from fedgen.tasks import objectives
from fedgen.data import batching
from fedgen.models import layers

pytestmark = pytest.mark.heavy  # every pairing of features, one compiled run each

VOCAB, WIDTH, CLIP = 13, 8, 0.05
ROBUST = ('median', 'trimmed_mean', 'norm_bound', 'multi_krum', 'geometric_median')
PRODUCT = ('exact_residual', 'svd_refactor', 'stack')
DIMS = {
    'method':
    ('fedavg_full', 'fedprox', 'fedprox_full', 'ditto', 'fedsa', 'local_only', 'centralized'),
    'aggregator': ROBUST,
    'lora': PRODUCT + ('ffa', ),
    'ranks': ('2,4', ),
    'dp': ('on', ),
    'secagg': ('on', ),
    'ema': ('on', ),
    'server_opt': ('fedadam', 'fedyogi', 'fedadagrad'),
}
FIELD = {
    'method': 'fed.algorithm',
    'aggregator': 'fed.aggregator',
    'lora': 'fed.lora_aggregation',
    'ranks': 'lora.client_ranks',
    'dp': 'fed.dp',
    'secagg': 'fed.secagg',
    'ema': 'fed.ema_decay',
    'server_opt': 'fed.server_opt',
}
NO_UPLOAD = ('local_only', 'centralized')
FULL = ('fedavg_full', 'fedprox_full')


def conflicts(c: dict) -> list[tuple[str, str]]:
    """The pairs of dimensions of combination ``c`` that cannot run together (the fate table)."""
    m, agg, lo = c.get('method', 'fedgen_edge'), c.get('aggregator'), c.get('lora')
    rules = [
        (c.get('secagg') and not c.get('dp'), ('secagg', 'dp')),
        (c.get('secagg') and agg, ('secagg', 'aggregator')),
        (c.get('dp') and agg, ('dp', 'aggregator')),
        (agg and c.get('ranks'), ('ranks', 'aggregator')),
        (agg and lo in PRODUCT, ('lora', 'aggregator')),
        (c.get('dp') and lo in PRODUCT, ('lora', 'dp')),
        (lo == 'exact_residual' and c.get('ranks'), ('lora', 'ranks')),
        (lo in PRODUCT and c.get('server_opt'), ('lora', 'server_opt')),
        (lo in PRODUCT and c.get('ema'), ('lora', 'ema')),
        (m in NO_UPLOAD and agg, ('method', 'aggregator')),
        (m in NO_UPLOAD + FULL + ('fedsa', ) and lo, ('method', 'lora')),
        (m in NO_UPLOAD and c.get('dp'), ('method', 'dp')),
        (m in NO_UPLOAD + FULL + ('fedsa', 'ditto') and c.get('ranks'), ('method', 'ranks')),
        (m == 'local_only' and c.get('server_opt'), ('method', 'server_opt')),
        (m in ('local_only', 'fedsa') and c.get('ema'), ('method', 'ema')),
    ]
    return [pair for cond, pair in rules if cond]


def combos() -> list[dict]:
    out = []
    for d in DIMS:  # each switch alone
        out += [{d: v} for v in DIMS[d]]
    for d1, d2 in itertools.combinations(DIMS, 2):
        out += [{d1: v1, d2: v2} for v1 in DIMS[d1] for v2 in DIMS[d2]]
    for d in DIMS:  # dp x secagg x X
        if d not in ('dp', 'secagg'):
            out += [{'dp': 'on', 'secagg': 'on', d: v} for v in DIMS[d]]
    return out


def config_of(c: dict, z: float = 0.0):
    cfg = ptb_fedgen_edge.get_config('tiny')
    over = {
        'fed.num_clients': 6,
        'fed.clients_per_round': 5,
        'fed.client_chunk': 5,
        'fed.rounds': 2,
        'fed.robust.f': 1,
        'lora.rank': 4,
        'lora.alpha': 8.0,
        'lora.targets': ('qv', ),
    }
    m = c.get('method')
    if m:
        over['fed.algorithm'] = 'fedprox' if m == 'fedprox_full' else m
        over.update({
            'fedprox': {
                'fed.prox_mu': 0.01
            },
            'ditto': {
                'fed.ditto_lambda': 0.1
            }
        }.get(m, {}))
        if m == 'fedprox_full':
            over.update({'fed.prox_mu': 0.01, 'fed.prox_target': 'full'})
    if c.get('aggregator'):
        over['fed.aggregator'] = c['aggregator']
    if c.get('lora'):
        over['fed.lora_aggregation'] = c['lora']
    if c.get('ranks'):
        over['lora.client_ranks'] = c['ranks']
    if c.get('dp'):
        over.update({'fed.dp.clip_norm': CLIP, 'fed.dp.noise_multiplier': z})
    if c.get('secagg'):
        over['fed.secagg.enabled'] = True
    if c.get('ema'):
        over['fed.ema_decay'] = 0.5
    if c.get('server_opt'):
        over.update({'fed.server_opt': c['server_opt'], 'fed.server_lr': 0.01})
    for k, v in over.items():
        compare.set_field(cfg, k, v)
    return cfg


class Attn(nn.Module):

    @nn.compact
    def __call__(self, h):
        return h + layers.Dense(WIDTH, name='q')(h) * layers.Dense(WIDTH, name='v')(h)


class Toy(nn.Module):
    """Embedding -> one LoRA-targeted 'attn' block (q, v) -> tied logits."""

    @nn.compact
    def __call__(self, tokens):
        emb = nn.Embed(VOCAB, WIDTH, name='wte')
        return emb.attend(Attn(name='attn')(emb(tokens)))


class ToyTask:
    loss_fn = staticmethod(objectives.next_token_loss(Toy()))


@pytest.fixture(scope='module')
def toy():
    """(token pool [48, 6], 6 uneven clients, the toy backbone's params)."""
    rng = np.random.default_rng(0)
    pool = {'tokens': rng.integers(0, VOCAB, (48, 6)).astype(np.int32)}
    bounds = np.cumsum([0, 4, 10, 6, 8, 12, 8])
    clients = [np.arange(bounds[i], bounds[i + 1]) for i in range(6)]
    params = Toy().init(jax.random.PRNGKey(0), pool['tokens'][:1])['params']
    return pool, clients, params


def two_rounds(cfg, toy):
    """(initial state, state after 2 rounds, the algorithm) of ``cfg`` on the toy problem."""
    pool, clients, params = toy
    p, alg = translate.spec(cfg).make_algorithm(ToyTask.loss_fn)
    frozen, trainable = algorithms.variables(p, params, jax.random.PRNGKey(1))
    state0 = alg.init(trainable, jax.random.PRNGKey(2))
    device = jax.local_devices()[0]  # committed inputs: round 2 reuses round 1's program
    apply, state, frozen = jax.jit(alg.apply), jax.device_put(state0, device), jax.device_put(
        frozen, device)
    for rnd in range(2):
        ids, _ = translate.spec(cfg).sample_round(rnd)
        data = batching.pack_clients(pool, clients, ids, 0, rnd, 4, 1, 3)
        state, metrics = apply(state, frozen, data)
    return state0, jax.device_get(state), alg


def distance(a, b) -> float:
    return float(optax.global_norm(jax.tree.map(jnp.subtract, a, b)))


# The even-indexed half; tests/test_combinations_b.py runs the odd half, so that pytest-xdist
# (one file per worker) spreads the 257 cases over two workers.
CASES = combos()[0::2]


def case_id(c: dict) -> str:
    return '+'.join(f'{k}_{v}' for k, v in c.items())


@pytest.mark.parametrize('combo', CASES, ids=[case_id(c) for c in CASES])
def test_combination_runs_or_is_refused_in_one_line(combo, toy):
    check(combo, toy)


def check(combo: dict, toy) -> None:
    """Refused in one line naming both fields of a conflict, or two rounds that do what they
    say (see the module docstring)."""
    pairs = conflicts(combo)
    cfg = config_of(combo)
    if pairs:
        with pytest.raises(ValueError) as err:
            translate.spec(cfg)
        msg = str(err.value)
        assert '\n' not in msg
        assert any(FIELD[a] in msg and FIELD[b] in msg for a, b in pairs), (msg, pairs)
        return
    translate.spec(cfg)
    state0, state, alg = two_rounds(cfg, toy)
    assert int(state.round) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.trainable))
    moved = distance(state.trainable, state0.trainable) > 0
    assert moved == (combo.get('method') != 'local_only')
    if alg.personal is not None:  # the clients' own trees moved
        assert distance(alg.personal(state), alg.personal(jax.device_get(state0))) > 0
    if not combo.get('dp'):
        assert translate.spec(cfg).accountant() is None
        return
    assert translate.spec(cfg).accountant() is None  # z = 0: clipping only, no epsilon
    noisy_cfg = config_of(combo, z=1e4)
    assert translate.spec(noisy_cfg).accountant().epsilon_after(2) < float('inf')
    _, noisy, _ = two_rounds(noisy_cfg, toy)
    assert distance(noisy.trainable, state.trainable) > 0  # the noise is really added
    if combo.get('server_opt') is None:  # sgd(1): a clipped mean moves at most CLIP a round
        assert distance(state.trainable, state0.trainable) <= 2 * CLIP * 1.0001
        assert distance(noisy.trainable, state0.trainable) > 100 * CLIP  # noise-dominated
