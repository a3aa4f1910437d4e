"""What the backward pass of the scanned decoder blocks keeps, and what that costs.

    python -m experiments.bench_residuals              # SmolLM2-135M geometry, B = 2 x T = 128
    python -m experiments.bench_residuals --model=gpt --layers=2 --batch=32 --seq=32  # main job

The gradient w.r.t. the LoRA adapters (r = 8, alpha 16 on the q and v projections) of the sum of
the blocks' outputs, x [B, T, D] -> [B, T, D], f32, under three ways to run the blocks:

- keep all: ``nn.scan`` of the plain block; the backward keeps every intermediate of every layer
  (what fedgen did before ``scan_blocks`` checkpointed the block);
- matmul outputs (the default, ``remat=False``): ``fedgen.models.layers.scan_blocks`` keeps the
  outputs of the matmuls without batch dimensions and recomputes the element-wise work;
- layer input (``remat=True``): keeps only each layer's input and recomputes the block.

Printed per row: XLA's temporary buffer size of the compiled gradient (``memory_analysis``; the
residuals live there, so this is exact and does not depend on the machine's load), the median of
``--repeats`` timed calls (rows interleaved call by call, so load hits them alike), and the
gradient's largest difference from the keep-all row relative to its largest entry.
"""
import statistics
import time

import numpy as np
from absl import app, flags

from experiments.machine import machine

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_enum('model', 'smollm2', ['smollm2', 'gpt'],
                      'SmolLM2-135M blocks (D 576) or the main PTB job\'s GPT blocks (D 128).')
    flags.DEFINE_integer('layers', 30, 'Decoder blocks L.')
    flags.DEFINE_integer('batch', 2, 'Sequences B.')
    flags.DEFINE_integer('seq', 128, 'Tokens per sequence T.')
    flags.DEFINE_integer('repeats', 5, 'Timed calls per row (median).')


def gradients(model: str, n_layer: int, b: int, t: int) -> tuple[dict, tuple]:
    """({row: jitted grad fn}, its arguments (lora, params, x, *block args))."""
    import flax.linen as nn
    import jax

    from fedgen.lora import adapters
    from fedgen.models import gpt, layers, llama
    if model == 'smollm2':
        cfg = llama.LlamaConfig(n_layer=n_layer)
        block, name, rules, axes = llama.Block, 'layers', 'llama_qv', (nn.broadcast, 0,
                                                                       nn.broadcast)
        params = llama.init_params(cfg, jax.random.PRNGKey(0))[name]
        extra = (np.arange(t), None, None)  # positions, no KV cache
    else:
        cfg = gpt.GPTConfig(n_layer=n_layer, n_positions=max(t, 64))
        block, name, rules, axes = gpt.Block, 'h', 'qv', ()
        params, extra = gpt.init_params(cfg, jax.random.PRNGKey(0))[name], ()
    lora = adapters.init(jax.random.PRNGKey(1), {name: params}, rules, 8)[name]
    # B = 0 at init would make every A gradient zero; give B small values so both are exercised
    lora = jax.tree.map(lambda v: v + 0.01 * jax.random.normal(jax.random.PRNGKey(2), v.shape),
                        lora)
    x = jax.random.normal(jax.random.PRNGKey(3), (b, t, cfg.n_embd))
    keep_all = nn.scan(block,
                       variable_axes={
                           'params': 0,
                           'lora': 0
                       },
                       split_rngs={'params': True},
                       in_axes=axes,
                       length=n_layer)
    rows = {
        'keep all (plain nn.scan)': keep_all,
        'matmul outputs (remat=False, default)': layers.scan_blocks(block, n_layer, False, axes),
        'layer input (remat=True)': layers.scan_blocks(block, n_layer, True, axes),
    }

    def grad_fn(stack):
        module = stack(cfg)

        def loss(lo, fr, x, *args):
            return module.apply({'params': fr, 'lora': lo}, x, *args)[0].sum()

        return jax.jit(jax.grad(loss))

    return {k: grad_fn(s) for k, s in rows.items()}, (lora, params, x, *extra)


def measure(model: str, n_layer: int, b: int, t: int,
            repeats: int) -> list[tuple[str, float, float, float]]:
    """[(row, temp MiB, median ms, max |g - g_keep_all| / max |g_keep_all|)]."""
    import jax
    import jax.numpy as jnp
    fns, args = gradients(model, n_layer, b, t)
    compiled = {k: f.lower(*args).compile() for k, f in fns.items()}
    grads = {k: jax.block_until_ready(c(*args)) for k, c in compiled.items()}
    times = {k: [] for k in compiled}
    for _ in range(repeats):
        for k, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[k].append(time.perf_counter() - t0)
    ref = jax.tree.leaves(grads[next(iter(grads))])
    out = []
    for k, c in compiled.items():
        g = jax.tree.leaves(grads[k])
        rel = max(float(jnp.abs(a - r).max() / jnp.abs(r).max()) for a, r in zip(g, ref))
        out.append((k, c.memory_analysis().temp_size_in_bytes / 2**20,
                    statistics.median(times[k]) * 1e3, rel))
    return out


def main(argv):
    del argv
    rows = measure(FLAGS.model, FLAGS.layers, FLAGS.batch, FLAGS.seq, FLAGS.repeats)
    base_mib, base_ms = rows[0][1], rows[0][2]
    lines = [
        f'Machine: {machine()}.', f'Gradient w.r.t. the adapters of {FLAGS.layers} '
        f'{FLAGS.model} blocks, B={FLAGS.batch} x T={FLAGS.seq}, f32; median of {FLAGS.repeats} '
        'interleaved calls.', '',
        '| backward keeps | XLA temp MiB | x keep all | ms | x keep all | '
        'max rel. grad diff |', '|---|---|---|---|---|---|'
    ]
    lines += [
        f'| {k} | {mib:.1f} | {mib / base_mib:.2f} | {ms:.0f} | {ms / base_ms:.2f} | {rel:.1e} |'
        for k, mib, ms, rel in rows
    ]
    print('\n'.join(lines))


if __name__ == '__main__':
    define_flags()
    app.run(main)
