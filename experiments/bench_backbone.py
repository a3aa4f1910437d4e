"""Memory and speed of one federated LoRA round on a big backbone: dtype, remat, chunked CE; and
the same work against the Hugging Face transformers + peft way.

    python -m experiments.bench_backbone                  # CPU: a small round, 8 rows
    python -m experiments.bench_backbone --clients 8 --steps 4 --batch 8 --seq 256   # a GPU
    python -m experiments.bench_backbone --peer           # fedgen vs HF + peft, 2 passes
    python -m experiments.bench_backbone --peer --quick   # the same, 2 blocks, seconds

``--peer`` (needs the ``interop`` extra): C = 10 clients x K = 2 steps x B = 2 x T = 128 tokens
(``--clients/--steps/--batch/--seq`` when given), float32, LoRA r = 8, alpha 16 on q, v, a fresh
AdamW(1e-3) per client, the mean of the adapters, 1 warm-up round and the median of
``--repeats``; each side in its own process per pass (:mod:`experiments.bench_peer`). Printed:
tokens/s, the ratio fedgen / peer, model FLOP/s against the machine's FP32 peak, and peak RSS.

Every row is one FedGen-Edge round (engine.make; C clients x S local Adam steps of B sequences
of T tokens, LoRA r=8 on q and v) over a Llama decoder with SmolLM2-135M's geometry (30 blocks,
d 576, 9/3 heads, FFN 1536, vocab 49,152, tied head; random weights), with:

- ``model.dtype``: float32, or bfloat16 frozen weights and compute (adapters, optimizer state and
  logits stay float32);
- ``model.remat``: ``jax.checkpoint`` around each block (activations recomputed backward);
- ``model.ce_chunk``: the cross-entropy over chunks of tokens (objectives.chunked_next_token_loss),
  so the [B T, 49152] logits never exist for a whole batch; 0 = one [B T, V] block;
- ``model.ce_vocab_chunk`` (rows only with ``--ce_vocab_chunk N``): the logits formed N
  vocabulary entries at a time under an online softmax (objectives.vocab_chunked_nll), so
  neither the [tokens, V] logits nor a compute-dtype copy of the whole head exist.

Each row runs in its own process. Reported: the median round time over --repeats rounds after a
compile, XLA's compiled memory (arguments + temporaries, from memory_analysis: what the round
needs, independent of allocator and load), and the measured peak (GPU: the device allocator's
peak_bytes_in_use; CPU: the process's peak RSS, which includes compilation). It writes
docs/results/bench_backbone_<platform>.md (generated) and prints the table with the machine.
"""
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from experiments.machine import machine

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This command's flags, defined only when it is the program."""
    flags.DEFINE_integer('clients', 2, 'Clients per round C.')
    flags.DEFINE_integer('steps', 2, 'Local steps S.')
    flags.DEFINE_integer('batch', 2, 'Sequences per step B.')
    flags.DEFINE_integer('seq', 64, 'Tokens per sequence T.')
    flags.DEFINE_integer('repeats', 3, 'Timed rounds per row.')
    flags.DEFINE_integer('ce_chunk', 256, 'Tokens per cross-entropy chunk when chunked.')
    flags.DEFINE_integer('ce_vocab_chunk', 0, '> 0: also rows with this vocabulary chunk.')
    flags.DEFINE_string(
        'row', '', 'Internal: run one row (dtype,remat,chunk[,vocab_chunk]) and '
        'print JSON.')
    flags.DEFINE_string('out', 'docs/results', 'Where the generated table goes.')
    flags.DEFINE_bool('peer', False, 'Same work: fedgen against HF transformers + peft.')
    flags.DEFINE_bool('quick', False, 'With --peer: 2 blocks, 2 clients x 1 step x 1 x 32.')
    flags.DEFINE_integer('passes', 2, 'With --peer: passes of both sides.')
    flags.DEFINE_integer('chunk', 1, 'With --peer: fedgen clients per map (1 = one at a time).')
    flags.DEFINE_string('side', '', 'Internal: run one --peer side (fedgen|peer) on --inputs.')
    flags.DEFINE_string('inputs', '', 'Internal: the directory bench_peer.write_inputs wrote.')


def one_row(dtype: str,
            remat: bool,
            chunk: int,
            c: int,
            s: int,
            b: int,
            t: int,
            repeats: int,
            vocab_chunk: int = 0) -> dict:
    import jax
    import optax

    from experiments import bench_peer
    from fedgen import algorithms
    from fedgen.tasks import objectives
    from fedgen.data.batching import RoundData
    from fedgen.models import layers, llama
    cfg = llama.LlamaConfig(n_positions=max(t + 1, 64), dtype=dtype, remat=remat)
    model = llama.Llama(cfg)
    params = llama.cast_frozen(llama.init_params(cfg, jax.random.PRNGKey(0)), dtype)
    loss = (objectives.chunked_next_token_loss(model, chunk, vocab_chunk)
            if chunk or vocab_chunk else objectives.next_token_loss(model))
    p = bench_peer.qv_method(c, c, optax.adam(1e-4))
    frozen, trainable = algorithms.variables(p, params, jax.random.PRNGKey(1))
    alg = algorithms.make(p, loss)
    state = alg.init(trainable, jax.random.PRNGKey(2))
    rng = np.random.default_rng(0)
    data = RoundData(client_ids=np.arange(c, dtype=np.int32),
                     batches={
                         'tokens': rng.integers(0, cfg.vocab_size,
                                                (c, s, b, t + 1)).astype(np.int32),
                         'weight': np.ones((c, s, b), np.float32)
                     },
                     mask=np.ones((c, s), np.float32),
                     n_k=np.full((c, ), 10.0, np.float32))
    step = jax.jit(alg.apply, compiler_options=layers.compiler_options(dtype))
    compiled = step.lower(state, frozen, data).compile()
    mem = compiled.memory_analysis()
    xla_bytes = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
    state, m = step(state, frozen, data)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = step(state, frozen, data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    peak = stats.get('peak_bytes_in_use') or resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        'dtype': dtype,
        'remat': remat,
        'ce_chunk': chunk,
        'ce_vocab_chunk': vocab_chunk,
        'round_s': statistics.median(times),
        'xla_MiB': xla_bytes / 2**20,
        'peak_MiB': peak / 2**20,
        'peak_kind': 'device' if 'peak_bytes_in_use' in stats else 'RSS',
        'loss': float(m['train_loss']),
        'device': dev.device_kind,
        'platform': dev.platform
    }


def peer_table(argv_shape: dict) -> None:
    """fedgen vs the HF + peft loop on the same work, ``--passes`` passes (module docstring)."""
    import shutil
    import tempfile

    from experiments import bench_peer
    quick = FLAGS.quick
    shape = {
        'clients': 2,
        'steps': 1,
        'batch': 1,
        'seq': 32
    } if quick else {
        'clients': 10,
        'steps': 2,
        'batch': 2,
        'seq': 128
    }
    shape.update(argv_shape)
    c, k, b, t = (shape[n] for n in ('clients', 'steps', 'batch', 'seq'))
    repeats = 1 if quick else FLAGS.repeats
    tmp = tempfile.mkdtemp(prefix='bench_peer_')
    cfg = bench_peer.write_inputs(tmp, c, k, b, t, n_layer=2 if quick else 30)
    tokens = c * k * b * t
    flop = bench_peer.flops_per_token(cfg, t) * tokens
    peak, machine_line = bench_peer.fp32_peak()
    rows = []
    for n in range(FLAGS.passes):
        for side in ('peer', 'fedgen'):
            load = os.getloadavg()[0]
            args = [
                sys.executable, '-m', 'experiments.bench_backbone', f'--side={side}',
                f'--inputs={tmp}', f'--repeats={repeats}', f'--chunk={FLAGS.chunk}'
            ]
            out = subprocess.run(args, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f'{side} failed:\n{out.stderr[-3000:]}')
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(n_pass=n + 1, load=load, tokens_s=tokens / r['round_s'])
            rows.append(r)
            print(r, flush=True)
    shutil.rmtree(tmp)  # the 538 MB weights directory
    lines = [
        f'Machine: {machine()}, torch {rows[0].get("torch", "?")}; FP32 peak: {machine_line}.',
        f'Work: SmolLM2-135M geometry ({cfg.n_layer} blocks), float32, C={c} clients x K={k} steps '
        f'x B={b} x T={t} = {tokens} tokens per round, LoRA r=8 alpha 16 on q, v, AdamW(1e-3) per '
        f'client; {flop / 1e12:.2f} TFLOP per round (model FLOPs). Median of {repeats} rounds '
        'after 1 warm-up; fedgen chunk '
        f'{FLAGS.chunk}; each side in its own process; load = 1-min load average at its start; '
        'tokens / CPU s counts both cores\' seconds (what a shared machine distorts least).', '',
        '| pass | side | tokens/s | fedgen / peer | GFLOP/s | % FP32 peak | tokens / CPU s | '
        'peak RSS MiB | x peer RSS | load |', '|---|---|---|---|---|---|---|---|---|---|'
    ]
    for n in range(FLAGS.passes):
        peer, ours = rows[2 * n], rows[2 * n + 1]
        for r in (peer, ours):
            gflops = flop / r['round_s'] / 1e9
            ratio = f'{ours["tokens_s"] / peer["tokens_s"]:.2f}' if r is ours else ''
            lines.append(f'| {n + 1} | {"fedgen" if r is ours else "HF + peft"} | '
                         f'{r["tokens_s"]:.1f} | {ratio} | {gflops:.1f} | '
                         f'{100 * gflops * 1e9 / peak:.0f}% | {tokens / r["cpu_s"]:.1f} | '
                         f'{r["peak_rss_MiB"]:.0f} | '
                         f'{r["peak_rss_MiB"] / peer["peak_rss_MiB"]:.2f} | {r["load"]:.1f} |')
    print('\n'.join(lines))


def main(argv):
    del argv
    if FLAGS.side:
        from experiments import bench_peer
        bench_peer.main_side(FLAGS.side, FLAGS.inputs, FLAGS.repeats, FLAGS.chunk)
        return
    if FLAGS.peer:
        given = {
            n: FLAGS[n].value
            for n in ('clients', 'steps', 'batch', 'seq') if FLAGS[n].present
        }
        peer_table(given)
        return
    shape = (FLAGS.clients, FLAGS.steps, FLAGS.batch, FLAGS.seq)
    if FLAGS.row:
        dtype, remat, chunk, *vocab = FLAGS.row.split(',')
        print(
            json.dumps(
                one_row(dtype, remat == '1', int(chunk), *shape, FLAGS.repeats,
                        int(vocab[0]) if vocab else 0)))
        return
    rows = []
    vocabs = (0, FLAGS.ce_vocab_chunk) if FLAGS.ce_vocab_chunk else (0, )
    for dtype, remat, chunk, vocab in itertools.product(('float32', 'bfloat16'), (0, 1),
                                                        (0, FLAGS.ce_chunk), vocabs):
        args = [
            sys.executable, '-m', 'experiments.bench_backbone',
            f'--row={dtype},{remat},{chunk},{vocab}', f'--clients={shape[0]}',
            f'--steps={shape[1]}', f'--batch={shape[2]}', f'--seq={shape[3]}',
            f'--repeats={FLAGS.repeats}'
        ]
        out = subprocess.run(args, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f'row {dtype},{remat},{chunk},{vocab} failed:\n'
                             f'{out.stderr[-3000:]}')
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = rows[0]
    c, s, b, t = shape
    lines = [
        '<!-- generated by: python -m experiments.bench_backbone '
        f'--clients {c} --steps {s} --batch {b} --seq {t}; do not edit -->',
        f'# One FedGen-Edge round on SmolLM2-135M geometry ({rows[0]["platform"]})', '',
        f'Machine: {machine()}.', f'Round: C={c} clients x S={s} steps x B={b} x T={t} tokens, '
        'LoRA r=8 on q, v; random weights. Times are medians of '
        f'{FLAGS.repeats} rounds after compilation; ratios are against the first row, '
        'measured in the same run.', '',
        '| dtype | remat | ce_chunk | ce_vocab_chunk | round s | x f32 | XLA MiB | x f32 | '
        f'peak MiB ({rows[0]["peak_kind"]}) |', '|---|---|---|---|---|---|---|---|---|'
    ]
    for r in rows:
        lines.append(f'| {r["dtype"]} | {"on" if r["remat"] else "off"} | {r["ce_chunk"] or "off"}'
                     f' | {r["ce_vocab_chunk"] or "off"} | {r["round_s"]:.3f} | '
                     f'{r["round_s"] / base["round_s"]:.2f} | '
                     f'{r["xla_MiB"]:.0f} | {r["xla_MiB"] / base["xla_MiB"]:.2f} | '
                     f'{r["peak_MiB"]:.0f} |')
    text = '\n'.join(lines) + '\n'
    print(text)
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, f'bench_backbone_{rows[0]["platform"]}.md'), 'w') as f:
        f.write(text)


if __name__ == '__main__':
    define_flags()
    app.run(main)
