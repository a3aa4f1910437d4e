"""Padded work: a Poisson DP round, and a round with dropouts, against a plain round of the same
expected clients, on the main PTB job's GPT (bench_round.PTB geometry).

    python -m experiments.bench_padding [--reps 5]

Rows (one FedGen-Edge round each, chunk k = 5, jitted once, median of ``reps`` rounds timed
round-robin):
  plain      C = m clients, every one present;
  all slots  C = m + pad clients, every one present (what a padded round cost when every slot
             ran its local steps);
  poisson    C = m + pad slots (the Poisson capacity), m present, the rest absent (n_k = 0);
  dropout    C = m + pad clients sampled, pad of them drop out (fed.dropout_rate);
and the ratios poisson / plain and dropout / plain. Absent and dropped clients sit in chunks that
``population.map_clients(active=...)`` skips, so the ratios should be near 1 (the goal is <= 1.15;
the remainder is the chunk that mixes present and absent clients, and the larger server step).
"""
import argparse
import statistics
import time

import jax
import numpy as np
import optax

from experiments.bench_round import PTB, build, machine, round_data
from fedgen import algorithms
from fedgen.fl import engine
from fedgen.data import batching


def interleaved(rounds: dict, reps: int) -> dict:
    """Median seconds of each jitted round, timed round-robin (one of each per repetition) so that
    a change of load on a shared machine hits every row alike; each compiles first."""
    for run in rounds.values():
        jax.block_until_ready(run())
    times = {name: [] for name in rounds}
    for _ in range(reps):
        for name, run in rounds.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def prepared(alg, frozen, trainable, data):
    """A no-argument call of one jitted round of ``alg`` on ``data``."""
    apply = jax.jit(alg.apply)
    state = jax.device_put(alg.init(trainable, jax.random.PRNGKey(2)))
    return lambda: apply(state, frozen, data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--m', type=int, default=10, help='expected (present) clients')
    ap.add_argument('--pad', type=int, default=10, help='absent slots / dropped clients')
    ap.add_argument('--chunk', type=int, default=5)
    args = ap.parse_args()
    loss_fn, params, adapters, field = build(PTB)
    frozen = jax.device_put({'params': params})
    trainable = {'lora': adapters}
    m, pad = args.m, args.pad

    def alg(faults=engine.Faults()):
        p = algorithms.MethodParams('fedgen_edge',
                                    m + pad,
                                    optax.adam(1e-3),
                                    optax.sgd(1.0),
                                    chunk=args.chunk,
                                    faults=faults)
        return algorithms.make(p, loss_fn)

    full = round_data(PTB, field, m + pad)
    present = (np.arange(m + pad) < m).astype(np.float32)
    rate = pad / (m + pad)
    t = interleaved(
        {
            'plain': prepared(alg(), frozen, trainable, round_data(PTB, field, m)),
            'every': prepared(alg(), frozen, trainable, full),  # what padding cost before
            'poisson': prepared(alg(), frozen, trainable, batching.drop_absent(full, present)),
            'dropout': prepared(alg(engine.Faults(dropout=rate)), frozen, trainable, full),
        },
        args.reps)
    plain, every, poisson, dropout = t['plain'], t['every'], t['poisson'], t['dropout']
    print(f'Machine: {machine()}')
    print(f'PTB GPT (d {PTB["n_embd"]}, {PTB["n_layer"]} layers, vocab {PTB["vocab"]}), LoRA r '
          f'{PTB["rank"]}, S={PTB["S"]} x B={PTB["B"]}, chunk {args.chunk}, median of '
          f'{args.reps} interleaved rounds')
    print('| round | clients (slots) | s / round | vs plain |')
    print('|---|---|---|---|')
    print(f'| plain | {m} ({m}) | {plain:.3f} | 1.00 |')
    print(f'| all slots present (the padded cost without skipping) | {m + pad} ({m + pad}) | '
          f'{every:.3f} | {every / plain:.2f} |')
    print(f'| Poisson DP capacity | {m} ({m + pad}) | {poisson:.3f} | {poisson / plain:.2f} |')
    print(f'| dropout {rate:.2f} | ~{m} ({m + pad}) | {dropout:.3f} | {dropout / plain:.2f} |')


if __name__ == '__main__':
    main()
