"""The scales of experiments.reproduce and their description in the report.

``SCALES[name]`` is the whole definition of a scale; :func:`describe` writes the report's scale
paragraph from that entry alone, so the text cannot drift from what was run.

Keys: arg / cifar_arg (the config variant, configs/<task>_<method>.py:<arg>), seeds (the main
comparison), rank_seeds / epoch_seeds / alpha_seeds (the ablations), ranks, epochs, alphas (the
ablation values), min_size (the smallest client in the alpha ablation's split), ptb / cifar
(config overrides), brown (bool), smollm2 (config variant or None), baselines (methods run with
seed 0 beside the two main ones), synthetic_data (tiny corpora written by the command).
"""
from experiments import compare

# every method of experiments.compare besides the two compared head to head
compare_baselines = tuple(m for m, _ in compare.METHODS if m not in ('fedgen_edge', 'fedavg_full'))
SCALES = {
    # smoke: the base values (rank 2, E 1, alpha 0.3) reuse the main group's runs.
    'smoke':
    dict(arg='tiny',
         seeds=(0, 1),
         rank_seeds=(0, 1),
         epoch_seeds=(0, 1),
         alpha_seeds=(0, 1),
         ranks=(1, 2),
         epochs=(1, 2),
         alphas=(0.3, 10.0),
         min_size=2,
         ptb={'fed.rounds': 2},
         cifar_arg='tiny',
         cifar={'fed.rounds': 2},
         brown=False,
         smollm2=None,
         baselines=('fedsa', ),
         synthetic_data=True),
    # cpu: about 2 h on 2 cores; the ablations run fewer seeds than the main comparison.
    'cpu':
    dict(arg='',
         seeds=(0, 1, 2),
         rank_seeds=(0, ),
         epoch_seeds=(0, ),
         alpha_seeds=(0, 1),
         ranks=(1, 2, 4, 8, 16, 32),
         epochs=(1, 2, 5),
         alphas=(0.1, 1.0, 10.0),
         min_size=10,
         ptb={
             'fed.rounds': 20,
             'fed.clients_per_round': 10,
             'fed.max_steps_per_epoch': 4,
             'eval.every': 5
         },
         cifar_arg='',
         cifar={
             'fed.rounds': 10,
             'eval.every': 2
         },
         brown=True,
         smollm2='cpu',
         baselines=compare_baselines,
         synthetic_data=False),
    'gpu':
    dict(arg='',
         seeds=(0, 1, 2),
         rank_seeds=(0, 1, 2),
         epoch_seeds=(0, 1, 2),
         alpha_seeds=(0, 1, 2),
         ranks=(1, 2, 4, 8, 16, 32),
         epochs=(1, 2, 5, 10),
         alphas=(0.1, 0.3, 1.0, 10.0),
         min_size=10,
         ptb={
             'fed.rounds': 200,
             'fed.clients_per_round': 10,
             'eval.every': 10,
             'fed.client_chunk': 10
         },
         cifar_arg='',
         cifar={
             'fed.rounds': 100,
             'eval.every': 10,
             'fed.client_chunk': 10,
             'model.conv_impl': 'xla'
         },
         brown=True,
         smollm2='',
         baselines=compare_baselines,
         synthetic_data=False),
}
PAPER = ('The paper: 100 clients for 500 rounds, a pre-trained generator, FID with '
         'Inception-v3 (no Inception weights offline: CIFAR-10 is scored by the FD in the '
         "features of a classifier trained here, 'FD (classifier features)', not FID).")
WORDS = {
    'fed.rounds': 'rounds',
    'fed.clients_per_round': 'clients per round',
    'fed.max_steps_per_epoch': 'at most {} local steps per epoch',
    'eval.every': 'evaluated every {} rounds',
    'fed.client_chunk': 'client chunk',
    'model.conv_impl': 'convolution'
}


def _overrides(over: dict) -> str:
    """'20 rounds, 10 clients per round, ...' (unknown keys as key=value); 'none' if empty."""
    out = []
    for k, v in over.items():
        w = WORDS.get(k)
        out.append(f'{k}={v}' if w is None else w.format(v) if '{}' in w else f'{v} {w}')
    return ', '.join(out) or 'no overrides'


def _seeds(s) -> str:
    return f'seed {s[0]} (n = 1)' if len(s) == 1 else f'seeds {list(s)} (n = {len(s)})'


def _config(task: str, arg) -> str:
    return f'configs/{task}_<method>.py' + (f':{arg}' if arg else ' (default variant)')


def describe(name: str, sc: dict) -> str:
    """The report's scale paragraph, from the ``SCALES[name]``-shaped entry ``sc`` only."""
    data = ('tiny synthetic data written by the command (a pipeline check: its numbers say '
            'nothing about the paper)' if sc['synthetic_data'] else 'the real corpora')
    base = ', '.join(sc['baselines']) or 'none'
    smol = ('not run' if sc['smollm2'] is None else 'FedGen-Edge and centralized, '
            f'{_config("ptb_smollm2", sc["smollm2"])}'.replace('<method>', 'fedgen_edge') +
            ', seed 0 (n = 1)')
    return (
        f'Scale {name!r} (experiments/scales.py), on {data}. PTB: '
        f'{_config("ptb", sc["arg"])} with {_overrides(sc["ptb"])}; FedGen-Edge vs full '
        f'FedAvg over {_seeds(sc["seeds"])}; other baselines ({base}): seed 0 (n = 1). '
        f'LoRA rank r in {list(sc["ranks"])}: {_seeds(sc["rank_seeds"])} (the base rank '
        f'is the main comparison, with its seeds); local epochs E in {list(sc["epochs"])}: '
        f'{_seeds(sc["epoch_seeds"])}; Dirichlet alpha in {list(sc["alphas"])} (clients of '
        f'at least {sc["min_size"]} examples): {_seeds(sc["alpha_seeds"])}. CIFAR-10: '
        f'{_config("cifar10", sc["cifar_arg"])} with {_overrides(sc["cifar"])}, seed 0 (n = 1). '
        f'Brown: {"both methods, seed 0 (n = 1)" if sc["brown"] else "not run"}. '
        f'SmolLM2-135M: {smol}. {PAPER}')
