"""The scales of experiments.reproduce and their description in the report.

``SCALES[name]`` is the whole definition of a scale; :func:`describe` writes the report's scale
paragraph from that entry alone, so the text cannot drift from what was run.

Keys: ptb (the main language-model study: every claim but 3), small_gpt (a second, smaller study
whose numbers are shown beside the main ones, or None), cifar_arg / cifar (the CIFAR-10 config
variant and overrides; None: not run), fmnist (the Fashion-MNIST image study,
experiments/image_study.py, keys there; None: not run), brown (bool), synthetic_data (tiny
corpora and images written by the command).

A study (experiments/lm_study.py) has: name (its directory), config and arg
(configs/<config>_<method>.py:<arg>), over (dotted config overrides), seeds (the main
comparison), personal_seeds (claim 4's document-split group), window_runs (optional: how many
of the main FedGen-Edge runs claim 4's window split personalizes; default len(personal_seeds)),
rank_seeds / epoch_seeds /
alpha_seeds (the ablations), ranks, epochs, alphas (the ablation values; empty: not run),
min_size (the smallest client of the alpha ablation's split), baselines (methods run with seed
0 beside the two compared), full_lrs (full FedAvg's client-lr grid, seed 0; empty: the
config's lr), edge_lrs (optional: FedGen-Edge's, likewise), pinned_lrs (optional: {method:
lr}, the lrs the grids chose, used without rerunning them; the grids run under
experiments.reproduce --tune), vmap_full (full FedAvg's seeds vmapped in one group, or one
group each) and whole (eval overrides under which the final
models are scored again, with an optional 'splits' tuple naming the splits scored, default
valid and test; or None).
"""
from experiments import compare

# every method of experiments.compare besides the two compared head to head
compare_baselines = tuple(m for m, _ in compare.METHODS if m not in ('fedgen_edge', 'fedavg_full'))
NO_ABLATIONS = dict(rank_seeds=(),
                    epoch_seeds=(),
                    alpha_seeds=(),
                    ranks=(),
                    epochs=(),
                    alphas=(),
                    min_size=10)
# Fashion-MNIST at the cpu and gpu scales: the backbone of docs/results/fmnist_backbone.md (8000
# steps, weight EMA 0.999), adapters on attention and the residual 3x3 convolutions, 20 rounds of
# 10 of 100 label-skewed clients, personalization of at most 32 steps per client at lr 1e-3 (of
# the personal_grid budgets, seed 0 chose it: against 8 steps it raised the own-class share,
# kept the held-out denoising MSE within 0.3% of the global model's and the samples'
# classifier confidence higher; lr 3e-3 and 1e-2 cost the held-out MSE more than 1%).
FMNIST = dict(arg='',
              over={
                  'lora.targets': ('attn', r'res/conv\d/kernel$'),
                  'lora.rank': 4,
                  'lora.alpha': 32.0,
                  'personalize.epochs': 1,
                  'personalize.lr': 1e-3,
                  'personalize.max_steps': 32
              },
              backbone=dict(steps=8000,
                            batch_size=16,
                            lr=1e-3,
                            ema_decay=0.999,
                            samples=500,
                            sample_steps=20),
              seeds=(0, 1),
              class_clients=8,
              class_samples=64,
              personal_grid=dict(lrs=(1e-3, 3e-3, 1e-2), steps=(8, 32)))
# The client lrs the cpu scale's grids chose (seed 0, final valid PPL on the first 100 lines:
# full FedAvg at 3e-5, 1e-4, 3e-4, 1e-3: 109.7, 87.4, 80.1, 109.0; FedGen-Edge at 1e-3, 3e-3,
# 1e-2, 3e-2: 115.8, 100.9, 97.7, diverged); the grids run again under reproduce --tune.
CPU_PINNED_LRS = {'fedavg_full': 3e-4, 'fedgen_edge': 1e-2}
SCALES = {
    # smoke: a pipeline check on tiny synthetic data, both studies' code paths.
    'smoke':
    dict(ptb=dict(name='ptb',
                  config='ptb_smollm2',
                  arg='tiny',
                  over={'fed.rounds': 2},
                  seeds=(0, 1),
                  personal_seeds=(0, 1),
                  rank_seeds=(0, 1),
                  epoch_seeds=(0, 1),
                  alpha_seeds=(0, 1),
                  ranks=(1, 2),
                  epochs=(1, 2),
                  alphas=(0.3, 10.0),
                  min_size=2,
                  baselines=('centralized', ),
                  full_lrs=(1e-3, 1e-2),
                  edge_lrs=(1e-3, 1e-2),
                  vmap_full=False,
                  whole={
                      'window': 8,
                      'stride': 8
                  }),
         small_gpt=dict(name='ptb_small',
                        config='ptb',
                        arg='tiny',
                        over={'fed.rounds': 2},
                        seeds=(0, 1),
                        personal_seeds=(0, 1),
                        baselines=('fedsa', ),
                        full_lrs=(),
                        vmap_full=True,
                        whole=None,
                        **NO_ABLATIONS),
         cifar_arg='tiny',
         cifar={'fed.rounds': 2},
         fmnist=dict(arg='tiny',
                     over={
                         'fed.rounds': 2,
                         'data.partition.min_size': 1
                     },
                     backbone=dict(steps=20,
                                   batch_size=8,
                                   lr=1e-3,
                                   ema_decay=0.9,
                                   samples=10,
                                   sample_steps=2),
                     seeds=(0, 1),
                     class_clients=2,
                     class_samples=4,
                     personal_grid=dict(lrs=(1e-3, 1e-2), steps=(1, ))),
         brown=False,
         synthetic_data=True),
    # cpu: SmolLM2-135M is the main study, 40 clients holding 20% of PTB train (per-client
    # training and evaluation dominate its cost); the small GPT's main comparison and claim 4
    # stand beside it. CIFAR-10 runs at the gpu scale.
    'cpu':
    dict(ptb=dict(name='smollm2',
                  config='ptb_smollm2',
                  arg='cpu',
                  over={
                      'fed.rounds': 8,
                      'eval.every': 4,
                      'fed.num_clients': 40,
                      'data.public_fraction': 0.8,
                      'personalize.max_steps': 4
                  },
                  seeds=(0, 1, 2),
                  personal_seeds=(0, 1),
                  window_runs=1,
                  rank_seeds=(0, 1),
                  epoch_seeds=(0, 1),
                  alpha_seeds=(),
                  ranks=(2, 8, 32),
                  epochs=(1, 2, 3),
                  alphas=(),
                  min_size=10,
                  baselines=('centralized', ),
                  full_lrs=(3e-5, 1e-4, 3e-4, 1e-3),
                  edge_lrs=(1e-3, 3e-3, 1e-2, 3e-2),
                  pinned_lrs=CPU_PINNED_LRS,
                  vmap_full=False,
                  whole={
                      'subset_lines': 0,
                      'window': 256,
                      'stride': 224,
                      'batch_size': 16,
                      'splits': ('test', )
                  }),
         small_gpt=dict(name='ptb',
                        config='ptb',
                        arg='',
                        over={
                            'fed.rounds': 20,
                            'fed.clients_per_round': 10,
                            'fed.max_steps_per_epoch': 4,
                            'eval.every': 5
                        },
                        seeds=(0, 1, 2),
                        personal_seeds=(0, 1, 2),
                        baselines=(),
                        full_lrs=(),
                        vmap_full=True,
                        whole=None,
                        **NO_ABLATIONS),
         cifar_arg='',
         cifar=None,
         fmnist=FMNIST,
         brown=False,
         synthetic_data=False),
    'gpu':
    dict(ptb=dict(name='smollm2',
                  config='ptb_smollm2',
                  arg='',
                  over={
                      'fed.rounds': 200,
                      'eval.every': 10
                  },
                  seeds=(0, 1, 2),
                  personal_seeds=(0, 1, 2),
                  rank_seeds=(0, 1, 2),
                  epoch_seeds=(0, 1, 2),
                  alpha_seeds=(0, 1, 2),
                  ranks=(1, 2, 4, 8, 16, 32),
                  epochs=(1, 2, 5, 10),
                  alphas=(0.1, 0.3, 1.0, 10.0),
                  min_size=10,
                  baselines=('centralized', ),
                  full_lrs=(3e-5, 1e-4, 3e-4, 1e-3),
                  edge_lrs=(1e-3, 3e-3, 1e-2),
                  vmap_full=False,
                  whole=None),
         small_gpt=dict(name='ptb',
                        config='ptb',
                        arg='',
                        over={
                            'fed.rounds': 200,
                            'fed.clients_per_round': 10,
                            'eval.every': 10,
                            'fed.client_chunk': 10
                        },
                        seeds=(0, 1, 2),
                        personal_seeds=(0, 1, 2),
                        baselines=compare_baselines,
                        full_lrs=(),
                        vmap_full=True,
                        whole=None,
                        **NO_ABLATIONS),
         cifar_arg='',
         cifar={
             'fed.rounds': 100,
             'eval.every': 10,
             'fed.client_chunk': 10,
             'model.conv_impl': 'xla'
         },
         fmnist=FMNIST,
         brown=True,
         synthetic_data=False),
}
PAPER = ('The paper: 100 clients for 500 rounds, a pre-trained generator, FID with '
         'Inception-v3 (no Inception weights offline: CIFAR-10 is scored by the FD in the '
         "features of a classifier trained here, 'FD (classifier features)', not FID).")


def _subset(lines: int) -> str:
    return f'the first {lines} lines of each split' if lines else 'the whole splits'


WORDS = {
    'fed.rounds': 'rounds',
    'fed.clients_per_round': 'clients per round',
    'fed.max_steps_per_epoch': 'at most {} local steps per epoch',
    'eval.every': 'evaluated every {} rounds',
    'fed.client_chunk': 'client chunk',
    'fed.num_clients': 'clients',
    'model.conv_impl': 'convolution',
    'data.public_fraction': "a share {} of the train text kept as the server's public portion",
    'data.partition.min_size': 'clients of at least {} windows',
    'personalize.max_steps': 'personalization of at most {} steps per epoch',
    'personalize.lr': 'personalization lr {}',
    'personalize.epochs': 'E_p = {}',
    'lora.rank': 'LoRA rank {}',
    'lora.alpha': 'alpha {}',
    'lora.targets': lambda v: 'adapters on ' + ' and '.join(f'`{t}`' for t in v),
    'window': 'window {}',
    'stride': 'stride {}',
    'batch_size': 'batches of {} windows',
    'subset_lines': _subset,
    'splits': lambda v: 'on the ' + ' and '.join(v) + (' split' if len(v) == 1 else ' splits')
}


def _overrides(over: dict) -> str:
    """'20 rounds, 10 clients per round, ...' (unknown keys as key=value); 'none' if empty."""
    out = []
    for k, v in over.items():
        w = WORDS.get(k)
        if callable(w):
            out.append(w(v))
        else:
            out.append(f'{k}={v}' if w is None else w.format(v) if '{}' in w else f'{v} {w}')
    return ', '.join(out) or 'no overrides'


def _seeds(s) -> str:
    return f'seed {s[0]} (n = 1)' if len(s) == 1 else f'seeds {list(s)} (n = {len(s)})'


def _config(task: str, arg) -> str:
    return f'configs/{task}_<method>.py' + (f':{arg}' if arg else ' (default variant)')


def _first(n: int) -> str:
    return ('the first main FedGen-Edge run (n = 1)'
            if n == 1 else f'the first {n} main FedGen-Edge runs (n = {n})')


def _ablation(label: str, values, seeds) -> str:
    return f'{label} in {list(values)}: {_seeds(seeds)}' if values else f'{label}: not run'


def study(st: dict) -> str:
    """One study's sentence, from its scale entry alone."""
    base = ', '.join(st['baselines']) or 'none'
    pins = st.get('pinned_lrs', {})
    grids = (('full FedAvg', st['full_lrs'], pins.get('fedavg_full')),
             ('FedGen-Edge', st.get('edge_lrs'), pins.get('fedgen_edge')))
    lrs = '; '.join((f"{name}'s client lr {pin:g}, chosen on {list(grid)} (seed 0, lowest final "
                     'valid PPL; the grid runs under --tune)' if pin is not None else
                     f"{name}'s client lr chosen on {list(grid)} (seed 0, lowest final valid "
                     'PPL)') if grid else f"{name} at its config's client lr"
                    for name, grid, pin in grids)
    whole = (f'final models scored again with {_overrides(st["whole"])}'
             if st['whole'] else 'final models scored by the per-round protocol')
    return (f'{_config(st["config"], st["arg"])} with {_overrides(st["over"])}; FedGen-Edge vs '
            f'full FedAvg over {_seeds(st["seeds"])}; {lrs}; other baselines ({base}): seed 0 '
            f'(n = 1); claim 4\'s document split over {_seeds(st["personal_seeds"])} and window '
            f'split on {_first(st.get("window_runs", len(st["personal_seeds"])))}; '
            f'{_ablation("LoRA rank r", st["ranks"], st["rank_seeds"])}; '
            f'{_ablation("local epochs E", st["epochs"], st["epoch_seeds"])}; '
            f'{_ablation("Dirichlet alpha", st["alphas"], st["alpha_seeds"])} (a setting equal '
            f'to the base config is the main comparison, with its seeds); {whole}')


def _fmnist(st) -> str:
    if st is None:
        return 'not run'
    b = st['backbone']
    return (f'a backbone pre-trained for {b["steps"]} steps of {b["batch_size"]} images (weight '
            f'EMA {b["ema_decay"]:g}), {b["samples"]} samples of {b["sample_steps"]} DDIM steps '
            f'scored; {_config("fmnist", st["arg"])} with {_overrides(st["over"])}, FedGen-Edge '
            f'vs full FedAvg over {_seeds(st["seeds"])}; own-class shares of '
            f'{st["class_clients"]} clients per seed, {st["class_samples"]} samples per model'
            f'{_grid(st.get("personal_grid"))}')


def _grid(g) -> str:
    """'; personalization budgets lr in {...} x steps in {...}' (experiments.personal_grid)."""
    if not g:
        return ''
    return (f'; personalization budgets lr in {{{", ".join(f"{x:g}" for x in g["lrs"])}}} x at '
            f'most {{{", ".join(str(x) for x in g["steps"])}}} steps')


def describe(name: str, sc: dict) -> str:
    """The report's scale paragraph, from the ``SCALES[name]``-shaped entry ``sc`` only."""
    data = ('tiny synthetic data written by the command (a pipeline check: its numbers say '
            'nothing about the paper)' if sc['synthetic_data'] else 'the real corpora')
    small = study(sc['small_gpt']) if sc['small_gpt'] else 'not run'
    cifar = ('not run' if sc['cifar'] is None else f'{_config("cifar10", sc["cifar_arg"])} with '
             f'{_overrides(sc["cifar"])}, seed 0 (n = 1)')
    return (f'Scale {name!r} (experiments/scales.py), on {data}. Main study (every claim but '
            f'3): {study(sc["ptb"])}. Second study: {small}. CIFAR-10: {cifar}. Fashion-MNIST: '
            f'{_fmnist(sc["fmnist"])}. Brown: '
            f'{"both methods, seed 0 (n = 1)" if sc["brown"] else "not run"}. {PAPER}')
