"""The same federated LoRA work done two ways: fedgen's compiled round and the HF + peft loop.

Used by ``python -m experiments.bench_backbone --peer`` (the table and the command are there).
Both sides read one Hugging Face directory of SmolLM2-135M geometry (random weights, written once
by :func:`write_inputs`) and one [C, K, B, T + 1] token array, and run, float32:

- fedgen: one FedGen-Edge round (engine round, the clients one at a time, ``chunk`` 1), LoRA
  r = 8, alpha 16 on q_proj and v_proj, a fresh AdamW(1e-3, weight decay 0.01) per client, the
  server's mean of the clients' A and B (equal n_k);
- peer: transformers' ``LlamaForCausalLM`` with a peft ``LoraConfig(r=8, lora_alpha=16,
  target_modules=['q_proj', 'v_proj'])``, a Python loop over the clients, each loading the global
  A and B, a fresh ``torch.optim.AdamW(lr=1e-3)`` (weight decay 0.01), K steps of next-token
  cross-entropy, then the mean of the clients' A and B.

Each side runs in its own process (so its peak RSS is its own) and prints one JSON line:
the median round time over ``repeats`` rounds after one warm-up round, and ru_maxrss. torch is
imported only here, a benchmark reference from the ``interop`` extra; fedgen never imports it.
"""
import json
import os
import resource
import statistics
import time

import numpy as np

LORA_RANK, LORA_ALPHA, LR, WEIGHT_DECAY = 8, 16.0, 1e-3, 0.01


def write_inputs(out_dir: str, c: int, k: int, b: int, t: int, n_layer: int = 30, seed: int = 0):
    """Writes out_dir/model (config.json + model.safetensors, N(0, 0.02) weights, unit norms) and
    out_dir/tokens.npy int32 [C, K, B, T + 1]; returns the LlamaConfig."""
    import jax

    from fedgen.models import llama
    from fedgen.io import weights_hf
    cfg = llama.LlamaConfig(n_positions=max(t + 1, 64), n_layer=n_layer)
    shapes = jax.eval_shape(lambda r: llama.init_params(cfg, r), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: np.ones(s.shape, np.float32) if p[-1].key == 'weight' else
        (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    weights_hf.save_hf_dir(os.path.join(out_dir, 'model'), 'llama', cfg, params)
    tokens = rng.integers(0, cfg.vocab_size, (c, k, b, t + 1)).astype(np.int32)
    np.save(os.path.join(out_dir, 'tokens.npy'), tokens)
    return cfg


def _cpu_s() -> float:
    """This process's CPU seconds (user + system, all threads) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _report(times: list, cpus: list, loss: float) -> dict:
    """Median wall and CPU seconds per round (CPU time is what a shared machine's load distorts
    least), the last loss and the process's peak RSS."""
    return {
        'round_s': statistics.median(times),
        'rounds_s': times,
        'cpu_s': statistics.median(cpus),
        'loss': loss,
        'peak_rss_MiB': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    }


def qv_method(num_clients: int, chunk: int, client_tx):
    """FedGen-Edge's MethodParams of the SmolLM2 benchmarks: LoRA r = 8, alpha 16 on q_proj and
    v_proj, ``client_tx`` fresh per client, the server's plain mean (sgd(1))."""
    import optax

    from fedgen import algorithms
    return algorithms.MethodParams(name='fedgen_edge',
                                   num_clients=num_clients,
                                   client_tx=client_tx,
                                   server_tx=optax.sgd(1.0),
                                   lora=algorithms.LoraSpec(LORA_RANK, LORA_ALPHA, ('llama_qv', )),
                                   chunk=chunk)


def fedgen_setup(in_dir: str, chunk: int = 1):
    """fedgen's side of the work in ``in_dir``: (model, MethodParams, frozen, trainable, tokens
    int32 [C, K, B, T + 1]), FedGen-Edge with LoRA r = 8, alpha 16 on q_proj and v_proj and a
    fresh AdamW per client."""
    import jax
    import optax

    from fedgen import algorithms
    from fedgen.io import weights, weights_hf
    from fedgen.models import llama
    tokens = np.load(os.path.join(in_dir, 'tokens.npy'))
    bb = weights_hf.load_hf_dir(os.path.join(in_dir, 'model'), lora_alpha=LORA_ALPHA)
    model = llama.Llama(bb.config)
    p = qv_method(tokens.shape[0], chunk, optax.adamw(LR, weight_decay=WEIGHT_DECAY))
    frozen, trainable = algorithms.variables(p, weights.to_device(bb.params), jax.random.PRNGKey(1))
    return model, p, frozen, trainable, tokens


def fedgen_side(in_dir: str, repeats: int, chunk: int = 1) -> dict:
    """fedgen's round on the inputs: {'round_s', 'rounds_s', 'loss', 'peak_rss_MiB',
    'compile_s'}."""
    import jax

    from fedgen import algorithms
    from fedgen.tasks import objectives
    from fedgen.data.batching import RoundData
    model, p, frozen, trainable, tokens = fedgen_setup(in_dir, chunk)
    c, k, b, _ = tokens.shape
    alg = algorithms.make(p, objectives.next_token_loss(model))
    state = alg.init(trainable, jax.random.PRNGKey(2))
    data = RoundData(client_ids=np.arange(c, dtype=np.int32),
                     batches={
                         'tokens': tokens,
                         'weight': np.ones((c, k, b), np.float32)
                     },
                     mask=np.ones((c, k), np.float32),
                     n_k=np.ones((c, ), np.float32))
    step = jax.jit(alg.apply, donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, data).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, frozen, data)  # warm-up round
    jax.block_until_ready(m)
    times, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), _cpu_s()
        state, m = compiled(state, frozen, data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        cpus.append(_cpu_s() - c0)
    return {**_report(times, cpus, float(m['train_loss'])), 'compile_s': compile_s}


def peer_side(in_dir: str, repeats: int) -> dict:
    """The HF transformers + peft per-client loop on the inputs; {'round_s', ...}."""
    import peft
    import torch
    import transformers
    torch.manual_seed(0)
    tokens = torch.as_tensor(np.load(os.path.join(in_dir, 'tokens.npy')), dtype=torch.long)
    c, k, _, _ = tokens.shape
    base = transformers.LlamaForCausalLM.from_pretrained(os.path.join(in_dir, 'model'),
                                                         torch_dtype=torch.float32)
    conf = peft.LoraConfig(r=LORA_RANK,
                           lora_alpha=LORA_ALPHA,
                           lora_dropout=0.0,
                           target_modules=['q_proj', 'v_proj'])
    model = peft.get_peft_model(base, conf).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    global_ad = {n: p.detach().clone() for n, p in named}
    vocab = model.config.vocab_size

    def one_round():
        total = {n: torch.zeros_like(v) for n, v in global_ad.items()}
        losses = []
        for client in range(c):
            with torch.no_grad():
                for n, p in named:
                    p.copy_(global_ad[n])
            opt = torch.optim.AdamW([p for _, p in named], lr=LR, weight_decay=WEIGHT_DECAY)
            for s in range(k):
                x = tokens[client, s]
                logits = model(input_ids=x[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab),
                                                         x[:, 1:].reshape(-1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss))
            with torch.no_grad():
                for n, p in named:
                    total[n] += p
        for n in global_ad:
            global_ad[n] = total[n] / c
        return float(np.mean(losses))

    one_round()  # warm-up round
    times, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), _cpu_s()
        loss = one_round()
        times.append(time.perf_counter() - t0)
        cpus.append(_cpu_s() - c0)
    return {
        **_report(times, cpus, loss), 'torch': torch.__version__,
        'threads': torch.get_num_threads()
    }


def flops_per_token(cfg, t: int) -> float:
    """Model FLOPs per trained token: 2 x the forward's (the forward, then the activation
    gradients; the frozen weights get none, LoRA's own terms are < 0.5% and left out). Forward:
    2 per multiply-add of every matmul weight (blocks and the tied head) plus attention's
    QK^T and PV over all T keys: 2 N_w + 4 T H d_h L."""
    d, f, hd, gd = cfg.n_embd, cfg.n_inner, cfg.n_head * cfg.d_head, cfg.n_kv_head * cfg.d_head
    per_block = d * hd + 2 * d * gd + hd * d + 3 * d * f
    weights_ = cfg.n_layer * per_block + d * cfg.vocab_size
    forward = 2 * weights_ + 4 * t * hd * cfg.n_layer
    return 2.0 * forward


def fp32_peak() -> tuple[float, str]:
    """(FLOP/s, description): cores x FP32 FLOP/cycle x the clock /proc/cpuinfo reports. Per cycle:
    64 on an Intel CPU with AVX-512 (two 512-bit FMA ports, as Xeon Scalable parts have; a float32
    GEMM of SmolLM2's shapes reached 206 GFLOP/s on a 2-core 2.0 GHz Xeon, above 2 x 32 x 2.0),
    32 with two 256-bit FMA pipes (AVX2, or AVX-512 on Zen 4), 16 without FMA."""
    from experiments.machine import cpuinfo
    info = cpuinfo()
    names, mhz, flags = info['names'], info['mhz'], info['flags']
    intel512 = 'avx512f' in flags and any('Intel' in n for n in names)
    per_cycle = 64 if intel512 else 32 if 'fma' in flags else 16
    ghz = (max(mhz) if mhz else 0.0) / 1000
    isa = 'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'SSE'
    cores = len(names)
    desc = (f'{names[0] if names else "?"} x{cores} ({isa}, {ghz:.2f} GHz; FP32 peak = {cores} x '
            f'{per_cycle} FLOP/cycle x {ghz:.2f} GHz = {cores * per_cycle * ghz:.0f} GFLOP/s)')
    return cores * per_cycle * ghz * 1e9, desc


def main_side(side: str, in_dir: str, repeats: int, chunk: int) -> None:
    """Runs one side and prints its JSON line (the subprocess entry point)."""
    out = fedgen_side(in_dir, repeats, chunk) if side == 'fedgen' else peer_side(in_dir, repeats)
    print(json.dumps({'side': side, **out}))
