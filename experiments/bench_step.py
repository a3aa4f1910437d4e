"""Where one local step's time goes on SmolLM2-135M geometry, and XLA's float32 GEMMs against
torch's on the step's matrix shapes.

    python -m experiments.bench_step            # B = 2 x T = 128, as bench_backbone --peer
    python -m experiments.bench_step --profile  # and the step's XLA ops by kind (a trace)

One client's LoRA step (r = 8, alpha 16 on q_proj and v_proj; random N(0, 0.02) weights written
by :func:`experiments.bench_peer.write_inputs`), each part jitted with the frozen tree as an
argument, median of ``--repeats`` calls after one warm-up:

- step: value_and_grad of the next-token loss w.r.t. the adapters (what a local step computes
  before the optimizer), and its forward alone;
- blocks: the 30 decoder blocks (``model.hidden``), forward and value_and_grad;
- head: the tied [576, 49,152] unembedding and the float32 cross-entropy on the blocks' output,
  forward and value_and_grad w.r.t. the hidden states.

FLOPs are model FLOPs (bench_peer.flops_per_token: 2 x the forward's matmul and attention FLOPs for
a forward-and-backward; half of it for a forward). The GEMM rows time [256, k] x [k, n] float32
products, XLA (jit(jnp.dot)) against torch.mm on 2 threads (torch from the ``interop`` extra,
a reference only). The frozen tree is placed on the device once, as the engine does, so no row
times a host-to-device copy. ``--profile`` adds the adapters' gradient through the 30 blocks traced
with ``jax.profiler``: the time of each XLA:CPU operation of the compiled program, summed by kind
(:func:`op_kinds`). Prints the tables with the machine line.
"""
import collections
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags

from experiments.machine import machine

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_integer('batch', 2, 'Sequences per step B.')
    flags.DEFINE_integer('seq', 128, 'Tokens per sequence T.')
    flags.DEFINE_integer('repeats', 5, 'Timed calls per row (median).')
    flags.DEFINE_bool('profile', False, "Also trace the blocks' gradient: XLA ops by kind.")


def _median_s(fn, *args, repeats: int) -> float:
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def op_kinds(events: list, hlo_text: str, calls: int) -> list[tuple[str, float, float]]:
    """[(kind, ms per call, share of the ops' time)], largest first, from the trace ``events``
    (Chrome trace 'X' events) of ``calls`` calls of the program ``hlo_text``: an event counts when
    its name is one of the program's instructions, and its kind is that name without the
    numeric suffix (ynn_fusion.37 -> ynn_fusion: a GEMM with its fused operands, run by XNNPACK;
    dynamic-slice_bitcast_fusion: a slice copied out of a stacked array)."""
    names = set(re.findall(r'^\s*(?:ROOT )?%?([\w.-]+) = ', hlo_text, re.M))
    total = collections.defaultdict(float)
    for e in events:
        if e.get('ph') == 'X' and e.get('name') in names:
            total[re.sub(r'\.\d+$', '', e['name'])] += e['dur'] / 1e3 / calls
    whole = sum(total.values()) or 1.0
    return sorted(((k, v, v / whole) for k, v in total.items()), key=lambda r: -r[1])


def profile_rows(fn, args: tuple, calls: int = 2) -> list[tuple[str, float, float]]:
    """:func:`op_kinds` of ``calls`` traced calls of the jitted ``fn(*args)`` (after one more)."""
    import jax
    d, compiled = tempfile.mkdtemp(prefix='bench_step_trace_'), fn.lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    with jax.profiler.trace(d):
        for _ in range(calls):
            jax.block_until_ready(compiled(*args))
    path = glob.glob(os.path.join(d, '**', '*.trace.json.gz'), recursive=True)[0]
    with gzip.open(path) as f:
        events = json.load(f)['traceEvents']
    shutil.rmtree(d)
    return op_kinds(events, compiled.as_text(), calls)


def step_rows(b: int, t: int, repeats: int, profile: bool = False) -> tuple[list, list]:
    """([(part, seconds, model FLOPs)] for one local step of B x T tokens, and the blocks'
    gradient's :func:`profile_rows` when ``profile``, else [])."""
    import jax

    from experiments import bench_peer
    from fedgen.tasks import objectives
    d = tempfile.mkdtemp(prefix='bench_step_')
    cfg = bench_peer.write_inputs(d, 1, 1, b, t)
    model, _, frozen, lora, tokens = bench_peer.fedgen_setup(d)
    tokens = tokens[0, 0]
    shutil.rmtree(d)  # the 538 MB weights directory
    batch = {'tokens': tokens, 'weight': np.ones((b, ), np.float32)}
    loss_fn = objectives.next_token_loss(model)
    step = lambda tr, fr: loss_fn({**fr, **tr}, batch, None)[0]

    def hidden(tr, fr):
        return model.apply({**fr, **tr}, tokens[:, :-1], method=model.hidden)

    blocks = lambda tr, fr: hidden(tr, fr).sum()
    h = jax.jit(hidden)(lora, frozen)

    def head(h, fr):
        return objectives.token_nll(model.apply(fr, h, method=model.unembed), tokens[:, 1:]).mean()

    total = bench_peer.flops_per_token(cfg, t) * b * t
    head_flops = 2 * 2 * b * t * cfg.n_embd * cfg.vocab_size  # forward + input gradient
    parts = [('step', step, (lora, frozen), total),
             ('blocks', blocks, (lora, frozen), total - head_flops),
             ('head + CE', head, (h, frozen), head_flops)]
    rows = []
    for name, fn, args, flops in parts:
        rows.append((f'{name}, value_and_grad',
                     _median_s(jax.jit(jax.value_and_grad(fn)), *args, repeats=repeats), flops))
        rows.append((f'{name}, forward', _median_s(jax.jit(fn), *args, repeats=repeats), flops / 2))
    ops = profile_rows(jax.jit(jax.grad(blocks)), (lora, frozen)) if profile else []
    return rows, ops


def gemm_rows(m: int, d: int, ff: int, vocab: int, repeats: int) -> list[tuple]:
    """[(shape, XLA GFLOP/s, torch GFLOP/s or None)] for the step's float32 GEMM shapes."""
    import jax
    import jax.numpy as jnp
    try:
        import torch
        torch.set_num_threads(2)
    except ImportError:
        torch = None
    dot, rows = jax.jit(jnp.dot), []
    for k, n in ((d, d), (d, ff), (ff, d), (d, vocab), (vocab, d)):
        a, b = (np.random.default_rng(0).random(s, np.float32) for s in ((m, k), (k, n)))
        flops = 2 * m * k * n
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        xla = flops / _median_s(dot, ja, jb, repeats=10 * repeats) / 1e9
        ref = None
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            ref = flops / _median_s(lambda: torch.mm(ta, tb).numpy(), repeats=10 * repeats) / 1e9
        rows.append((f'[{m}, {k}] x [{k}, {n}]', xla, ref))
    return rows


def main(argv):
    del argv
    b, t = FLAGS.batch, FLAGS.seq
    steps, ops = step_rows(b, t, FLAGS.repeats, FLAGS.profile)
    gemms = gemm_rows(b * t, 576, 1536, 49152, FLAGS.repeats)
    lines = [
        f'Machine: {machine()}.', f'One local step: B={b} x T={t} tokens, SmolLM2-135M '
        f'geometry, float32; median of {FLAGS.repeats} calls.', '',
        '| part | ms | model GFLOP | GFLOP/s |', '|---|---|---|---|'
    ]
    lines += [f'| {n} | {s * 1e3:.0f} | {f / 1e9:.1f} | {f / s / 1e9:.0f} |' for n, s, f in steps]
    lines += ['', '| float32 GEMM | XLA GFLOP/s | torch GFLOP/s |', '|---|---|---|']
    lines += [f'| {n} | {x:.0f} | {"-" if r is None else f"{r:.0f}"} |' for n, x, r in gemms]
    if ops:
        lines += [
            '', "The blocks' gradient, traced: ms per call of each kind of XLA:CPU op, summed "
            '(independent ops run side by side on the two threads, so the sum exceeds the wall '
            'time):', '', '| op kind | ms | share |', '|---|---|---|'
        ]
        lines += [f'| {k} | {ms:.1f} | {100 * sh:.1f}% |' for k, ms, sh in ops[:10]]
    print('\n'.join(lines))


if __name__ == '__main__':
    define_flags()
    app.run(main)
