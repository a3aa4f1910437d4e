"""Compile time of one federated LoRA round on SmolLM2-135M geometry, against depth.

    python -m experiments.bench_compile                     # 2, 10 and 30 blocks
    python -m experiments.bench_compile --layers 2,30 --remat

Each depth runs in its own process (a fresh XLA compilation cache): the round of
``experiments.bench_backbone`` (engine round, C clients x S local Adam steps of B x T tokens,
LoRA r=8 on q and v, float32), traced on abstract arrays (no weights are materialised), then
lowered and compiled. Reported per depth: trace+lower seconds, XLA compile seconds, their sum and
the ratio of the sum to the shallowest depth's. With the blocks as a scan the compiled program
holds one block body whatever the depth, so the ratio should stay near 1.
"""
import json
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This command's flags, defined only when it is the program."""
    flags.DEFINE_string('layers', '2,10,30', 'Comma-separated depths (n_layer).')
    flags.DEFINE_integer('clients', 10, 'Clients per round C.')
    flags.DEFINE_integer('chunk', 1, 'Clients per vmap (the population chunk).')
    flags.DEFINE_integer('steps', 2, 'Local steps S.')
    flags.DEFINE_integer('batch', 2, 'Sequences per step B.')
    flags.DEFINE_integer('seq', 128, 'Tokens per sequence T.')
    flags.DEFINE_bool('remat', False, 'jax.checkpoint around each block.')
    flags.DEFINE_integer('one', 0, 'Internal: measure this depth and print JSON.')


def measure(n_layer: int, c: int, chunk: int, s: int, b: int, t: int, remat: bool) -> dict:
    """Seconds to trace+lower and to compile one round at depth ``n_layer`` (abstract inputs)."""
    import jax
    import jax.numpy as jnp
    import optax

    from experiments import bench_peer
    from fedgen import algorithms
    from fedgen.tasks import objectives
    from fedgen.data.batching import RoundData
    from fedgen.models import llama
    cfg = llama.LlamaConfig(n_positions=max(t + 1, 64), n_layer=n_layer, remat=remat)
    model = llama.Llama(cfg)
    p = bench_peer.qv_method(c, chunk, optax.adam(1e-3))
    alg = algorithms.make(p, objectives.next_token_loss(model))

    def build(key):
        params = llama.init_params(cfg, key)
        frozen, trainable = algorithms.variables(p, params, key)
        return frozen, alg.init(trainable, key)

    frozen, state = jax.eval_shape(build, jax.random.PRNGKey(0))
    sd = jax.ShapeDtypeStruct
    data = RoundData(client_ids=sd((c, ), jnp.int32),
                     batches={
                         'tokens': sd((c, s, b, t + 1), jnp.int32),
                         'weight': sd((c, s, b), jnp.float32)
                     },
                     mask=sd((c, s), jnp.float32),
                     n_k=sd((c, ), jnp.float32))
    t0 = time.perf_counter()
    lowered = jax.jit(alg.apply).lower(state, frozen, data)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {'n_layer': n_layer, 'lower_s': t1 - t0, 'compile_s': t2 - t1, 'total_s': t2 - t0}


def main(argv):
    del argv
    shape = (FLAGS.clients, FLAGS.chunk, FLAGS.steps, FLAGS.batch, FLAGS.seq, FLAGS.remat)
    if FLAGS.one:
        print(json.dumps(measure(FLAGS.one, *shape)))
        return
    rows = []
    for n in [int(x) for x in FLAGS.layers.split(',')]:
        args = [
            sys.executable, '-m', 'experiments.bench_compile', f'--one={n}',
            f'--clients={FLAGS.clients}', f'--chunk={FLAGS.chunk}', f'--steps={FLAGS.steps}',
            f'--batch={FLAGS.batch}', f'--seq={FLAGS.seq}', f'--remat={FLAGS.remat}'
        ]
        out = subprocess.run(args, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f'depth {n} failed:\n{out.stderr[-3000:]}')
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = rows[0]['total_s']
    print(f'\nC={FLAGS.clients} (chunk {FLAGS.chunk}) x S={FLAGS.steps} x B={FLAGS.batch} x '
          f'T={FLAGS.seq}, remat={"on" if FLAGS.remat else "off"}\n')
    print('| blocks | trace+lower s | compile s | total s | x shallowest |')
    print('|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["n_layer"]} | {r["lower_s"]:.1f} | {r["compile_s"]:.1f} | '
              f'{r["total_s"]:.1f} | {r["total_s"] / base:.2f} |')


if __name__ == '__main__':
    define_flags()
    app.run(main)
