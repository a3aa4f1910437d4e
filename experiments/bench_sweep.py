"""R federated runs per round: one vmapped program (experiments.sweep) vs R sequential calls.

    python -m experiments.bench_sweep                       # R in {3, 8}, 3 timed rounds each
    python -m experiments.bench_sweep --runs 3 --repeats 2 --out docs/results/bench_sweep.md

Shapes are configs/ptb_fedgen_edge.py's defaults: a 2-layer, 128-wide GPT over a 10k vocabulary,
sequence 32, LoRA rank 4 on q, v and the MLP, C = 10 clients per round, S = 8 local Adam steps of
B = 16 windows, client chunk 5, sgd(1.0) server; random weights and tokens (timing needs no data).
Each run r has its own adapters, rng and round data (other clients and tokens).

  sequential  the same jitted ``alg.apply`` called R times per round, one call per run (as R
              separate experiments.train processes would run it, minus their process overhead);
  vmapped     one jitted ``vmap(alg.apply, in_axes=(0, None, 0))`` over the R stacked runs, the
              backbone passed once (fedgen/fl/runs.py).

Each row runs in a fresh child process: round time is the median over --repeats rounds after one
untimed round (compile and warm-up); peak RSS is the child's ru_maxrss (Python + jax runtime
included); XLA temp / args+out are compiled.memory_analysis() of the round program (for
sequential: one call's program; its R states and data add (R - 1) x its arguments when resident).
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

from configs import ptb_fedgen_edge
from experiments import translate
from experiments.bench_round import machine
from fedgen import algorithms
from fedgen.tasks import objectives
from fedgen.fl import runs as fsweep
from fedgen.data.batching import RoundData
from fedgen.models import gpt

VOCAB = 10000


def problem(runs: int):
    """(alg, frozen, states [R] list, round data [R] list) at the default PTB shapes."""
    c = ptb_fedgen_edge.get_config('')
    p = translate.spec(c).method
    m = c.model
    cfg = gpt.GPTConfig(vocab_size=VOCAB,
                        n_positions=m.n_positions,
                        n_embd=m.n_embd,
                        n_layer=m.n_layer,
                        n_head=m.n_head,
                        lora_alpha=c.lora.alpha)
    params = gpt.init_params(cfg, jax.random.PRNGKey(0))
    alg = algorithms.make(p, objectives.next_token_loss(gpt.GPT(cfg)))
    fed, rng = c.fed, np.random.default_rng(0)
    cpr, s, b, t = fed.clients_per_round, fed.max_steps_per_epoch, fed.batch_size, c.data.seq_len
    states, data, frozen = [], [], None
    for r in range(runs):
        frozen, trainable = algorithms.variables(p, params, jax.random.PRNGKey(10 + r))
        states.append(alg.init(trainable, jax.random.PRNGKey(100 + r)))
        ids = np.sort(rng.choice(fed.num_clients, cpr, replace=False)).astype(np.int32)
        data.append(
            RoundData(client_ids=ids,
                      batches={
                          'tokens': rng.integers(0, VOCAB, (cpr, s, b, t + 1)).astype(np.int32),
                          'weight': np.ones((cpr, s, b), np.float32)
                      },
                      mask=np.ones((cpr, s), np.float32),
                      n_k=rng.integers(20, 200, cpr).astype(np.float32)))
    return alg, frozen, states, data


def child(job: dict) -> dict:
    """One row: compile, one untimed round, then job['repeats'] timed rounds."""
    runs, variant = job['runs'], job['variant']
    alg, frozen, states, data = problem(runs)
    dev = jax.local_devices()[0]
    frozen = jax.device_put(frozen, dev)
    t0 = time.perf_counter()
    if variant == 'vmapped':
        state, batch = jax.device_put((fsweep.stack(states), fsweep.stack(data)), dev)
        compiled = jax.jit(fsweep.vmap_round(alg.apply)).lower(state, frozen, batch).compile()
        step = lambda: compiled(state, frozen, batch)[0]
    else:
        states, data = jax.device_put((states, data), dev)
        compiled = jax.jit(alg.apply).lower(states[0], frozen, data[0]).compile()
        step = lambda: [compiled(s, frozen, d)[0] for s, d in zip(states, data)]
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    jax.block_until_ready(step())
    times = []
    for _ in range(job['repeats']):
        t0 = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - t0)
    return {
        'round_s': statistics.median(times),
        'times': times,
        'compile_s': compile_s,
        'temp_mb': mem.temp_size_in_bytes / 2**20,
        'io_mb': (mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20,
        'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    }


def run_child(job: dict) -> dict:
    cmd = [sys.executable, '-m', 'experiments.bench_sweep', f'--child={json.dumps(job)}']
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {'error': (proc.stderr.strip().splitlines() or ['?'])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    out = [
        '| R | variant | round s (median) | s per run-round | vs sequential | compile s | '
        'XLA temp MB | XLA args+out MB | peak RSS MB |', '|' + '---|' * 9
    ]
    seq = {}
    for job, m in rows:
        lead = f"| {job['runs']} | {job['variant']} |"
        if 'error' in m:
            out.append(lead + f" failed: {m['error']} |" + ' |' * 6)
            continue
        if job['variant'] == 'sequential':
            seq[job['runs']] = m['round_s']
        ref = seq.get(job['runs'])
        speed = f"{ref / m['round_s']:.2f}x" if ref else '-'
        out.append(lead + f" {m['round_s']:.4g} | {m['round_s'] / job['runs']:.4g} | {speed} | "
                   f"{m['compile_s']:.1f} | {m['temp_mb']:.0f} | {m['io_mb']:.1f} | "
                   f"{m['rss_mb']:.0f} |")
    return '\n'.join(out)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """This command's flags, defined only when it is the program."""
    flags.DEFINE_list('runs', ['3', '8'], 'Values of R (runs per round).')
    flags.DEFINE_integer('repeats', 3, 'Timed rounds per row (after one untimed round).')
    flags.DEFINE_string('out', '', 'Also write the table (markdown) to this file.')
    flags.DEFINE_string('child', '', 'Internal: run one row (JSON job) and print its result.')


def main(argv):
    del argv
    if FLAGS.child:
        print(json.dumps(child(json.loads(FLAGS.child))))
        return
    t0, rows = time.time(), []
    for r in (int(x) for x in FLAGS.runs):
        for variant in ('sequential', 'vmapped'):
            job = {'runs': r, 'variant': variant, 'repeats': FLAGS.repeats}
            rows.append((job, run_child(job)))
            print(table(rows).splitlines()[-1], flush=True)
    text = (f'# {len(rows)} rows, {FLAGS.repeats} timed rounds each, '
            f'{(time.time() - t0) / 60:.1f} min\n\nMachine: {machine()}\n\n{table(rows)}\n')
    print('\n' + text)
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or '.', exist_ok=True)
        with open(FLAGS.out, 'w') as f:
            f.write(text)


if __name__ == '__main__':
    define_flags()
    app.run(main)
