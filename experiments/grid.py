"""Measured comparisons on PTB: robust aggregation, privacy-utility and LoRA aggregation.

    python -m experiments.grid --grid robust --workdir runs/grid_robust
    python -m experiments.grid --grid privacy --workdir runs/grid_privacy
    python -m experiments.grid --grid lora --workdir runs/grid_lora
    python -m experiments.grid --grid robust --scale tiny --source DIR --workdir /tmp/g  # smoke

Every row is experiments.train on configs/ptb_fedgen_edge.py at the grid scale below, with the
same seed, data, split and (pre-trained once, then shared) backbone; only the row's overrides
differ. Each run lives in <workdir>/<row>, so a killed grid resumes where it stopped. The table
is written to docs/results/<grid>.md with its figures beside it (<grid>.png; lora_error.png) and
to <workdir>/<grid>.json; docs/robustness.md, privacy.md and lora_aggregation.md hold the analysis.
A row whose run already finished with the same config is read back, not re-evaluated.

Grid scale ('cpu'): the default PTB setting (100 clients, topic split, 2-layer GPT, rank-4 LoRA)
with 20 clients per round, 20 rounds and at most 4 local steps, evaluated at the end on ptb.valid;
'tiny' is the :tiny config on a corpus directory (--source), for tests.
"""
import json
import os
import statistics
import time

from absl import flags

from configs import ptb_fedgen_edge
from fedgen.metrics import plots
from experiments import train, writers
from experiments.console import log, require, run_main
from experiments.machine import machine

GRIDS = ('robust', 'privacy', 'lora')
SCALES = ('cpu', 'tiny')
SCALE = {
    'cpu': {
        'fed.clients_per_round': 20,
        'fed.rounds': 20,
        'fed.max_steps_per_epoch': 4,
        'eval.every': 20,
    },
    'tiny': {
        'fed.clients_per_round': 4,
        'fed.num_clients': 4,
        'data.verify_md5': False,
    },
}
AGGREGATORS = ('mean', 'median', 'trimmed_mean', 'norm_bound', 'multi_krum', 'geometric_median')


def rows(grid: str) -> list[tuple[str, str, dict]]:
    """(row name, group, config overrides) of a grid; a group's first row is its reference."""
    if grid == 'robust':
        out = []
        for frac in (0.0, 0.1, 0.3):
            attack = {'fed.attack.kind': 'sign_flip', 'fed.attack.fraction': frac} if frac else {}
            for agg in AGGREGATORS:
                robust = {'fed.robust.f': 2, 'fed.robust.beta': 0.3} if agg != 'mean' else {}
                out.append((f'attack{int(100 * frac)}_{agg}', f'attack{frac}', {
                    'fed.aggregator': agg,
                    **attack,
                    **robust
                }))
        return out
    if grid == 'privacy':
        dp = {'fed.dp.clip_norm': 0.5, 'fed.dp.sampling': 'poisson'}
        return [('eps_inf', 'dp', {}), ('clip_only', 'dp', {
            **dp, 'fed.dp.noise_multiplier': 0.0
        }), ('eps_8', 'dp', {
            **dp, 'fed.dp.target_epsilon': 8.0
        }), ('eps_2', 'dp', {
            **dp, 'fed.dp.target_epsilon': 2.0
        })]
    if grid == 'lora':
        out = []
        for alpha in (0.1, 1.0):
            # Dir(0.1) over 100 clients leaves no draw with every client >= 20 windows; both
            # alphas use the same, lower floor so that only alpha differs between the groups.
            split = {'data.partition.alpha': alpha, 'data.partition.min_size': 10}
            for agg in ('avg_ab', 'exact_residual', 'svd_refactor', 'ffa', 'stack'):
                out.append((f'a{alpha}_{agg}', f'a{alpha}', {**split, 'fed.lora_aggregation': agg}))
            # FedEx-LoRA with the residual re-factorized to rank 4 (the dense residual above).
            out.append((f'a{alpha}_exact_residual_k4', f'a{alpha}', {
                **split, 'fed.lora_aggregation': 'exact_residual',
                'fed.residual_rank': 4
            }))
            out.append((f'a{alpha}_fedsa', f'a{alpha}', {**split, 'fed.algorithm': 'fedsa'}))
            for agg in ('avg_ab', 'svd_refactor'):
                out.append((f'a{alpha}_ranks248_{agg}', f'a{alpha}', {
                    **split, 'fed.lora_aggregation': agg,
                    'lora.client_ranks': '2,4,8',
                    'lora.rank': 8
                }))
        return out
    raise ValueError(f'--grid must be one of {GRIDS}, got {grid!r}')


def config_for(scale: str, overrides: dict, source: str):
    c = ptb_fedgen_edge.get_config('tiny' if scale == 'tiny' else '')
    for dotted, value in {**SCALE[scale], **overrides}.items():
        *path, last = dotted.split('.')
        node = c
        for p in path:
            node = node[p]
        node[last] = value
    if source:
        c.data.source = source
    return c


def summarize(name: str, group: str, overrides: dict, summary: dict, workdir: str) -> dict:
    """One table row from a finished run's summary and metrics.jsonl."""
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    rounds = len(metrics)
    err = [(m['round'], m['lora_agg_error']) for m in metrics
           if m.get('lora_agg_error') is not None]
    eps = [m['dp_epsilon'] for m in metrics if m.get('dp_epsilon') is not None]
    return {
        'row': name,
        'group': group,
        'overrides': overrides,
        'final_valid_ppl': summary.get('final_valid_ppl'),
        'backbone_valid_ppl': summary.get('backbone_valid_ppl'),
        'round_s_median': statistics.median(m['round_s'] for m in metrics),
        'up_MB_per_round': summary['up_bytes_total'] / rounds / 1e6,
        'down_MB_per_round': summary['down_bytes_total'] / rounds / 1e6,
        'lora_agg_error_mean': statistics.fmean(e for _, e in err) if err else None,
        'lora_agg_error_curve': err,
        'dp_epsilon': eps[-1] if eps else None,
        'clients_used_mean': statistics.fmean(m.get('clients_used', 0) for m in metrics)
    }


def cell(v) -> str:
    if v is None:
        return 'n/a'
    if isinstance(v, float):
        return 'inf' if v == float('inf') else f'{v:.4g}'
    return str(v)


def markdown(grid: str, scale: str, table: list[dict], wall: float) -> str:
    """The table; rel_round_time is relative to the first row of the same group (the plain
    weighted mean, eps = inf, or avg_ab at that alpha)."""
    ref = {}
    for r in table:
        ref.setdefault(r['group'], r['round_s_median'])
    cols = [
        'row', 'final_valid_ppl', 'round_s_median', 'rel_round_time', 'up_MB_per_round',
        'down_MB_per_round', 'lora_agg_error_mean', 'dp_epsilon', 'clients_used_mean'
    ]
    lines = [
        f'<!-- generated by: python -m experiments.grid --grid {grid} --scale {scale}; '
        'do not edit -->', f'# PTB {grid} grid ({scale} scale, {len(table)} runs)', '',
        f'Machine: {machine()}. This invocation took {wall / 60:.1f} min (rows already '
        'finished in the workdir are reloaded, not rerun). round_s_median: median wall seconds '
        'of a round, evaluation rounds included; rel_round_time: relative to the first row of '
        'the same group.', '', '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)
    ]
    for r in table:
        r = {**r, 'rel_round_time': r['round_s_median'] / ref[r['group']]}
        lines.append('| ' + ' | '.join(cell(r[c]) for c in cols) + ' |')
    lines += ['', f'![final valid PPL per row]({grid}.png)']
    if grid == 'lora':
        lines.append(f'![aggregation error per round]({grid}_error.png)')
    return '\n'.join(lines) + '\n'


def figures(grid: str, table: list[dict], docs: str) -> list[str]:
    """docs/results/<grid>.png: final valid PPL per row (one bar colour per group); for the lora
    grid also <grid>_error.png, the aggregation error per round of every row."""
    groups = list(dict.fromkeys(r['group'] for r in table))

    def label(r):
        return r['row'].split('_', 1)[1] if len(groups) > 1 else r['row']

    labels = list(dict.fromkeys(label(r) for r in table))
    by = {(r['group'], label(r)): r for r in table}
    series = {
        g: [by[(g, x)]['final_valid_ppl'] if (g, x) in by else None for x in labels]
        for g in groups
    }
    paths = [os.path.join(docs, f'{grid}.png')]
    bb = table[0].get('backbone_valid_ppl')
    plots.grouped_bars(labels,
                       series,
                       paths[0],
                       'final valid PPL (lower is better)',
                       f'PTB {grid} grid',
                       reference=None if bb is None else ('frozen backbone', bb))
    if grid == 'lora':
        paths.append(os.path.join(docs, f'{grid}_error.png'))
        plots.curves({r['row']: r['lora_agg_error_curve']
                      for r in table}, paths[1], 'round',
                     '||mean(BA) - mean(B) mean(A)||_F / ||mean(BA)||_F',
                     'LoRA aggregation error per round')
    return paths


def run_grid(grid: str, scale: str, workdir: str, source: str = '', docs: str = 'docs/results'):
    """Runs (or resumes) every row; returns the table rows and writes the markdown/json."""
    t0, table, backbone = time.time(), [], ''
    for name, group, overrides in rows(grid):
        config = config_for(scale, overrides, source)
        if backbone:
            config.pretrain.backbone_path = backbone
        wd = os.path.join(workdir, name)
        log(f'--- {grid}/{name}: {overrides}')
        summary = writers.finished(config.to_json_best_effort(), wd) or train.run(config, wd)
        if not backbone:  # the first run pre-trained it; every later row loads the same weights
            cache = os.path.join(wd, 'backbone')
            backbone = os.path.join(cache, sorted(os.listdir(cache))[0])
        table.append(summarize(name, group, overrides, summary, wd))
    wall = time.time() - t0
    os.makedirs(docs, exist_ok=True)
    text = markdown(grid, scale, table, wall)
    if scale != 'tiny':
        with open(os.path.join(docs, f'{grid}.md'), 'w') as f:
            f.write(text)
        figures(grid, table, docs)
    with open(os.path.join(workdir, f'{grid}.json'), 'w') as f:
        json.dump(table, f, indent=1)
    log(text)
    return table


FLAGS = flags.FLAGS


def define_flags() -> None:
    """This command's flags, defined only when it is the program, so that modules and tests
    importing experiments.grid for its functions share the flag registry with other commands."""
    flags.DEFINE_enum('grid', None, GRIDS, 'Which comparison to run.')
    flags.DEFINE_enum('scale', 'cpu', SCALES, 'Grid scale.')
    flags.DEFINE_string('workdir', None, 'Parent directory of the runs.')
    flags.DEFINE_string('source', '', 'PTB source override (a directory for tiny).')


def main(argv):
    del argv
    require('grid', 'workdir')
    run_grid(FLAGS.grid, FLAGS.scale, FLAGS.workdir, FLAGS.source)


if __name__ == '__main__':
    define_flags()
    run_main(main)
