"""The numbers of the reproduction report, from experiments/reproduce.py's results.

``measure`` turns the runs' summaries and metrics.jsonl rows into every number REPORT.md states
(JSON-safe); experiments/report.py turns them into verdicts, tables and figures.
"""
import statistics

import jax
import numpy as np

from experiments.claims import bootstrap_share, std


def param_bytes(params) -> dict:
    """Bytes of the backbone tree: whole model, embedding leaves (any path through a key named
    wte / wpe / embed*), and the rest ('blocks': the transformer blocks and the final norm)."""
    whole = emb = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        n = int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
        keys = [str(getattr(k, 'key', k)) for k in path]
        whole += n
        emb += n if any(k in ('wte', 'wpe') or k.startswith('embed') for k in keys) else 0
    return {'whole': whole, 'embedding': emb, 'blocks': whole - emb}


def _finals(g: dict, metric: str) -> list:
    return [r['summary'].get(f'final_{metric}') for r in g['runs']]


def values(v: list) -> dict:
    """Per-seed values (None: a failed run), their mean, sample std and count n."""
    ok = [x for x in v if x is not None]
    return {
        'per_seed': list(v),
        'mean': statistics.fmean(ok) if ok else None,
        'std': std(ok) if ok else None,
        'n': len(ok)
    }


def stats(g: dict, metric: str) -> dict:
    """Per-seed finals of ``metric``, their mean, sample std and count n (:func:`values`)."""
    return values(_finals(g, metric))


def personal_stats(summary: dict | None) -> dict | None:
    """The personal models' mean client-test metric (vs the backbone on the same clients)."""
    if not summary:
        return None
    v = summary['vs_backbone']
    return {
        'mean': v['mean_personal'],
        'backbone': v['mean_reference'],
        'clients': v['clients'],
        'source': summary['personal_source']
    }


def no_global(personal: dict | None) -> dict:
    """A method without a global model: its global number does not exist (the backbone's
    number would stand in for it), so only the personal one is reported."""
    return {
        'per_seed': [],
        'mean': None,
        'std': None,
        'n': 0,
        'global': False,
        'personal': personal
    }


def personal_shares(runs: list) -> dict:
    """Claim 4's numbers from experiments.lm_study.personalization outputs, one per training
    seed: seed 0's clients, share improved vs the global model with its bootstrap 95% CI and
    median gain (Fig. 5), and every seed's (share, lo, hi)."""
    seeds = []
    for run in runs:
        rows = [r for r in run['rows'] if r['gain_vs_global'] is not None]
        gains = [r['gain_vs_global'] for r in rows]
        seeds.append({
            'clients': len(rows),
            'ci': bootstrap_share([g > 0 for g in gains]),
            'median_gain': float(np.median(gains)) if rows else None
        })
    return {
        'clients': seeds[0]['clients'],
        'share': seeds[0]['ci'][0],
        'ci': list(seeds[0]['ci'][1:]),
        'median_gain': seeds[0]['median_gain'],
        'per_seed': [list(s['ci']) for s in seeds]
    }


def method_stats(run: dict, metric: str) -> dict:
    """One single run's stats: ``run`` is {summary, rows, has_global (default True), personal
    (experiments.lm_study.personalization's output, for methods without a global model)}."""
    if run.get('has_global', True):
        return {**stats({'runs': [run]}, metric), 'global': True}
    return no_global(personal_stats(run.get('personal', {}).get('summary')))


def curve(runs: list, key: str) -> tuple:
    """(rounds, mean, std) of ``key`` over runs, at the rounds every run logged it."""
    per = [{r['round']: r[key] for r in run['rows'] if r.get(key) is not None} for run in runs]
    per = [p for p in per if p]
    if not per:
        return [], [], None
    xs = sorted(set.intersection(*[set(p) for p in per]))
    vals = np.array([[p[x] for x in xs] for p in per], np.float64)
    std = vals.std(0, ddof=1).tolist() if len(per) > 1 else None
    return xs, vals.mean(0).tolist(), std


def whole(p: dict) -> dict:
    """The final models scored under the study's second protocol (lm_study.whole_scores):
    {method: {split: values()}, 'backbone': {split: ppl}, 'protocol': {window, stride,
    <split>_words}, 'splits': the splits scored (of 'valid', 'test'; the backbone's)}."""
    w = p['whole']
    b = w['backbone']
    splits = [s for s in ('valid', 'test') if f'{s}_ppl' in b]
    out = {
        k: {
            s: values([x.get(f'{s}_ppl') for x in runs])
            for s in splits
        }
        for k, runs in w.items() if k != 'backbone'
    }
    out['backbone'] = {s: b[f'{s}_ppl'] for s in splits}
    first = splits[0] if splits else 'valid'
    out['protocol'] = {
        'window': b.get(f'{first}_window'),
        'stride': b.get(f'{first}_stride'),
        **{
            f'{s}_words': b.get(f'{s}_words')
            for s in splits
        }
    }
    out['splits'] = splits
    return out


def study(p: dict) -> dict:
    """Every number of one experiments.lm_study section (its setup included)."""
    m = {'setup': p['setup']}
    edge, full = p['main']['fedgen_edge'], p['main']['fedavg_full']
    e_up = edge['runs'][0]['summary'].get('up_bytes_total', float('nan'))
    f_up = full['runs'][0]['summary'].get('up_bytes_total', float('nan'))
    pb = p['param_bytes']
    m['uplink'] = {
        'fedgen_edge': e_up,
        'fedavg_full': f_up,
        'param_bytes': pb,
        'fedavg_blocks': f_up * pb['blocks'] / pb['whole'],
        'reduction_whole': 1 - e_up / f_up,
        'reduction_blocks': 1 - e_up / (f_up * pb['blocks'] / pb['whole'])
    }
    m['ptb'] = {k: {**stats(g, 'valid_ppl'), 'global': True} for k, g in p['main'].items()}
    main_run = (p.get('personal_window_seeds') or [p['personal']])[0]  # the main runs' seed 0
    m['ptb']['fedgen_edge']['personal'] = personal_stats(main_run['summary'])
    m['ptb'].update({k: method_stats(r, 'valid_ppl') for k, r in p['baselines'].items()})
    first = edge['runs'][0]['summary']
    m['ptb_backbone'] = first.get('backbone_valid_ppl')
    m['eval'] = {k: first.get(f'final_valid_{k}') for k in ('window', 'stride', 'words')}
    m['personal'] = personal_shares(p['personal_seeds'])
    if p.get('personal_window_seeds'):
        m['personal_window'] = personal_shares(p['personal_window_seeds'])
    m['rank'] = {
        r: {
            **stats(g, 'valid_ppl'), 'up_bytes_per_round':
            g['runs'][0]['summary'].get('up_bytes_total', 0) / max(1, p['setup']['rounds'])
        }
        for r, g in p['rank'].items()
    }
    m['epochs'] = {}
    for e, g in p['epochs'].items():
        d = [  # per seed: the round mean of the client drift
            statistics.fmean(x)
            for x in ([r['client_drift'] for r in run['rows'] if r.get('client_drift') is not None]
                      for run in g['runs']) if x
        ]
        m['epochs'][e] = {
            **stats(g, 'valid_ppl'), 'drift': statistics.fmean(d) if d else None,
            'drift_per_seed': d
        }
    m['noniid'] = {
        a: {
            k: stats(g, 'valid_ppl')
            for k, g in v.items()
        }
        for a, v in p['noniid'].items()
    }
    if p.get('whole'):
        m['whole'] = whole(p)
    for grid, lr in (('lr_grid', 'full_lr'), ('edge_lr_grid', 'edge_lr')):
        m[grid] = {
            lr: g['runs'][0]['summary'].get('final_valid_ppl')
            for lr, g in p.get(grid, {}).items()
        }
        m[lr] = p.get(lr)
    m['lr_tuning'] = p.get('lr_tuning', {})
    return m


def measure(res: dict) -> dict:
    """Every number the report states, from reproduce's results (JSON-safe): the main study's
    at the top level, the second study's under 'small_gpt', then CIFAR-10 and Brown."""
    m = study(res['ptb'])
    if 'small_gpt' in res:
        m['small_gpt'] = study(res['small_gpt'])
    c = res['cifar10']
    m['cifar10'] = ({
        'skipped': c['skipped']
    } if 'skipped' in c else {
        k: stats({'runs': [r]}, 'fd_classifier')
        for k, r in c.items()
    })
    for name in ('brown', ):
        b = res.get(name, {'skipped': 'not run'})
        m[name] = {
            'skipped': b['skipped']
        } if 'skipped' in b else {
            k: stats({'runs': [r]}, 'valid_ppl')
            for k, r in b.items()
        }
        if 'skipped' not in b:  # the frozen backbone's PPL on the same text (zero-shot)
            first = next(iter(b.values()))['summary']
            m[name + '_backbone'] = first.get('backbone_valid_ppl')
            m[name + '_eval'] = {
                k: first.get(f'final_valid_{k}')
                for k in ('window', 'stride', 'words')
            }
    return m
