"""One federated round, run five ways side by side; writes docs/results/bench_round.md.

The table is generated (docs/performance.md holds the hand-written reading of it).

    python -m experiments.bench_round            # C in {8, 32, 100} (PTB), {4, 8} (U-Net)
    python -m experiments.bench_round --quick    # a few minutes on a 2-core CPU

Variants, all on the same model, synthetic data shapes [C, S, B, ...], Adam clients, sgd(1) server:
  (a) loop      one jitted per-client lax.scan over S steps, called C times from Python (jit once,
                reused), then a jitted weighted mean + server step: how per-client frameworks run;
  (b) vmap      fedgen's round with chunk = C (one vmap over every client);
  (c) chunk=k   fedgen's round with lax.map(batch_size=k) (the default engine);
  (d) full      full-model FedAvg (every backbone leaf trainable) on the same engine, chunk k.

Each variant runs in a fresh child process, so its peak RSS (getrusage ru_maxrss) is its own.
Round time is the median over rounds after compile. Model FLOPs per round = C * S * FLOPs of one
local step (XLA cost analysis of the jitted gradient of one batch: XLA does not multiply while-loop
bodies by their trip count, so the round program itself cannot be costed directly).
MFU = FLOPs per round / round time / peak, with peak measured here as the best of a jitted
2048 x 2048 f32 matmul (2 n^3 FLOPs).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedgen import algorithms
from fedgen.aggregators import weighting as aggregate
from fedgen.fl import local_update as client
from fedgen.models import diffusion
from fedgen.fl import engine
from fedgen.lora import adapters as lora
from fedgen.tasks import objectives
from experiments.machine import machine
from fedgen.data.batching import RoundData
from fedgen.models import gpt, unet
from fedgen.tasks import cifar10

PTB = dict(model='gpt',
           vocab=10000,
           seq_len=32,
           n_embd=128,
           n_layer=2,
           n_head=4,
           rank=8,
           targets='qv',
           B=16,
           S=4)
UNET = dict(model='unet', rank=8, targets='attn', B=8, S=2)


def build(spec: dict):
    """(loss_fn, backbone params, adapters, one client's batches field -> [S, B, ...])."""
    if spec['model'] == 'gpt':
        cfg = gpt.GPTConfig(vocab_size=spec['vocab'],
                            n_positions=spec['seq_len'],
                            n_embd=spec['n_embd'],
                            n_layer=spec['n_layer'],
                            n_head=spec['n_head'])
        model = gpt.GPT(cfg)
        params = gpt.init_params(cfg, jax.random.PRNGKey(0))
        loss_fn = objectives.next_token_loss(model)
        field = ('tokens', (spec['seq_len'] + 1, ), np.int32, spec['vocab'])
    else:
        cfg = unet.UNetConfig()
        model = unet.UNet(cfg)
        params = unet.init_params(cfg, jax.random.PRNGKey(0))
        loss_fn = cifar10.denoising_loss(model, diffusion.make_schedule('linear', 1000))
        field = ('images', (32, 32, 3), np.uint8, 256)
    adapters = lora.init(jax.random.PRNGKey(1), params, spec['targets'], spec['rank'])
    return loss_fn, params, adapters, field


def round_data(spec: dict, field, c: int) -> RoundData:
    """Synthetic dense round: every step and example valid, uneven n_k."""
    rng = np.random.default_rng(0)
    name, shape, dtype, high = field
    full = (c, spec['S'], spec['B']) + shape
    x = rng.integers(0, high, full)
    return RoundData(client_ids=np.arange(c, dtype=np.int32),
                     batches={
                         name: x.astype(dtype),
                         'weight': np.ones((c, spec['S'], spec['B']), np.float32)
                     },
                     mask=np.ones((c, spec['S']), np.float32),
                     n_k=rng.integers(20, 200, c).astype(np.float32))


def step_flops(loss_fn, frozen, trainable, data: RoundData) -> float:
    """XLA-counted FLOPs of one local step's gradient on one batch."""
    batch = jax.tree.map(lambda x: x[0, 0], data.batches)
    g = jax.jit(jax.grad(lambda w: loss_fn({**frozen, **w}, batch, jax.random.PRNGKey(0))[0]))
    cost = g.lower(trainable).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops'])


def child(job: dict) -> dict:
    """Runs one variant: compile, then timed rounds. Returns its measurements."""
    spec, c, variant, chunk = job['spec'], job['C'], job['variant'], job.get('chunk', 0)
    loss_fn, params, adapters, field = build(spec)
    data = round_data(spec, field, c)
    if variant == 'full':
        frozen, trainable = {}, {'params': params}
    else:
        frozen, trainable = {'params': params}, {'lora': adapters}
    client_tx, server_tx = optax.adam(1e-3), optax.sgd(1.0)
    p = algorithms.MethodParams('fedgen_edge',
                                c,
                                client_tx,
                                server_tx,
                                chunk=chunk if variant in ('chunk', 'full') else c)
    alg = algorithms.make(p, loss_fn)
    state = alg.init(trainable, jax.random.PRNGKey(2))
    t0 = time.perf_counter()
    if variant == 'loop':
        upd = jax.jit(client.make_local_update(loss_fn, client_tx))
        keys = engine.client_keys(state, jnp.asarray(data.client_ids))
        per = [(jax.tree.map(lambda x, k=k: jnp.asarray(x[k]), {
            'batches': data.batches,
            'mask': data.mask
        }), keys[k]) for k in range(c)]

        @jax.jit
        def finish(state, deltas, n_k):
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *deltas)
            return engine.server_step(state, aggregate.weighted_mean(stacked, n_k), server_tx)

        def run(state):
            deltas = [upd(frozen, state.trainable, d, k, state.trainable).delta for d, k in per]
            return finish(state, deltas, data.n_k)

        jax.block_until_ready(run(state))  # compiles the client scan and the server step
    else:
        compiled = jax.jit(alg.apply).lower(state, frozen, data).compile()
        run = lambda state: compiled(state, frozen, data)[0]
        jax.block_until_ready(run(state))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(job['rounds']):
        t0 = time.perf_counter()
        jax.block_until_ready(run(state))
        times.append(time.perf_counter() - t0)
    flops = c * spec['S'] * step_flops(loss_fn, frozen, trainable, data)
    return {
        'round_s': statistics.median(times),
        'compile_s': compile_s,
        'flops': flops,
        'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        'units': c * spec['S'] * spec['B'] * (spec['seq_len'] if spec['model'] == 'gpt' else 1)
    }


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best FLOP/s of a jitted n x n f32 matmul on the default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = float('inf')
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def plan(quick: bool) -> list[dict]:
    """Every (model, C, variant, chunk) job, loop first in each group."""
    jobs = []
    rounds = 2 if quick else 5
    ptb = dict(PTB, S=2) if quick else PTB
    for c in ((8, 100) if quick else (8, 32, 100)):
        # A full vmap at C=100 holds 100 clients' 10k-vocab logits at once (several GB): quick
        # mode leaves it out.
        vs = [('loop', 0)] + ([('vmap', 0)] if c <= (32 if quick else 100) else [])
        vs += [('chunk', k) for k in (4, 8) if k < c] + [('full', 4)]
        jobs += [dict(spec=ptb, C=c, variant=v, chunk=k, rounds=rounds) for v, k in vs]
    unet_spec = dict(UNET, B=4, S=1) if quick else UNET
    for c in ((2, ) if quick else (4, 8)):
        vs = [('loop', 0), ('vmap', 0)] + ([('chunk', 2)] if c > 2 else []) + [('full', 2)]
        jobs += [dict(spec=unet_spec, C=c, variant=v, chunk=k, rounds=rounds) for v, k in vs]
    return jobs


def run_child(job: dict) -> dict:
    cmd = [sys.executable, '-m', 'experiments.bench_round', '--child', json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {'error': proc.stderr.strip().splitlines()[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], peak: float) -> str:
    head = ('| model | C | S | B | variant | round s (median) | tokens or images / s | vs (a) | '
            'compile s | peak RSS MB | RSS vs (a) | GFLOP / round | MFU |')
    out = [head, '|' + '---|' * 13]
    base = {}
    for r in rows:
        j, m = r['job'], r['res']
        name = j['variant'] + (f" (chunk={j['chunk']})" if j['variant'] in ('chunk',
                                                                            'full') else '')
        key = (j['spec']['model'], j['C'])
        lead = f"| {j['spec']['model']} | {j['C']} | {j['spec']['S']} | {j['spec']['B']} | {name} |"
        if 'error' in m:
            out.append(lead + f" failed: {m['error']} |" + ' |' * 8)
            continue
        if j['variant'] == 'loop':
            base[key] = m
        b = base.get(key)
        speed = f"{b['round_s'] / m['round_s']:.2f}x" if b else '-'
        rss = f"{m['rss_mb'] / b['rss_mb']:.2f}x" if b else '-'
        out.append(lead + f" {m['round_s']:.3f} | {m['units'] / m['round_s']:,.0f} | {speed} | "
                   f"{m['compile_s']:.1f} | {m['rss_mb']:,.0f} | {rss} | {m['flops'] / 1e9:,.1f} | "
                   f"{100 * m['flops'] / m['round_s'] / peak:.1f}% |")
    return '\n'.join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer C values and rounds')
    ap.add_argument('--out', default='docs/results/bench_round.md')
    ap.add_argument('--child', default='', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    t_start = time.time()
    peak = matmul_peak()
    print(f'measured matmul peak: {peak / 1e9:.1f} GFLOP/s', flush=True)
    rows = []
    for job in plan(args.quick):
        rows.append({'job': job, 'res': run_child(job)})
        print(table(rows, peak).splitlines()[-1], flush=True)
    cmd = 'python -m experiments.bench_round' + (' --quick' if args.quick else '')
    text = TEMPLATE.format(cmd=cmd,
                           machine=machine(),
                           peak=peak / 1e9,
                           table=table(rows, peak),
                           ptb=json.dumps(PTB),
                           unet=json.dumps(UNET),
                           minutes=(time.time() - t_start) / 60)
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
        f.write(text + NOTES)
    print(f'wrote {args.out}')


TEMPLATE = """# Performance: one federated round, five ways

Generated by `{cmd}` ({minutes:.1f} min).

Machine: {machine}. Measured f32 matmul peak (jitted 2048^3): {peak:.1f} GFLOP/s.

Defaults: PTB model `{ptb}`; U-Net fedgen/models/unet.py defaults (6.5M params), `{unet}`
(`--quick` uses S=2 for PTB and B=4, S=1 for the U-Net; the table's S and B columns are the truth).
Synthetic data of the real shapes; Adam on clients, sgd(1.0) on the server; every step valid.

{table}

Columns: round time is the median over rounds after compile; "vs (a)" is the loop's round time over
this row's (higher is faster), measured in the same run; peak RSS is the child process's
ru_maxrss (each variant runs in a fresh process, so peaks do not mask each other; it includes the
~0.3-0.5 GB of the Python + jax runtime); GFLOP / round = C * S * XLA-counted FLOPs of one local
gradient step (the same model FLOPs for every LoRA variant, so MFU compares like with like).
"""

NOTES = """
## Notes

- The machine is shared with other jobs, so timings are noisy: read the same-run ratios rather
  than absolute times, and treat differences under ~10% as noise.
- Memory: the chunked engine's peak is bounded by the chunk, not C (compare chunk rows at C=8 and
  C=100). `population.chunk_for_budget(population.client_bytes(...), budget, C_local)` picks the
  chunk from a memory budget; `client_bytes` is XLA's memory analysis of a 2-client minus a
  1-client vmap of the client function (abstract shapes, no compute).
- Sharding: `algorithms.make(p, loss_fn, mesh=population.client_mesh(n))` runs each device's
  C / n clients under `jax.shard_map` (backbone and global adapters replicated, client axis
  P('clients')); the weighted mean over the sharded client axis is a local sum plus an
  all-reduce. Checked equal to the 1-device rounds of every method on 4 fake CPU devices
  (tests/test_sharding.py).
- GPU: no GPU was available for this run; nothing in fedgen assumes a CPU. On a GPU run this
  script unchanged and add the card's table here; there chunk = C (full vmap) is expected to win.
"""

if __name__ == '__main__':
    main()
