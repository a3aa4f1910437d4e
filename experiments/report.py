"""The reproduction report: REPORT.md and its figures.

experiments/reproduce.py launches the runs and hands their summaries and metrics.jsonl rows here;
``write`` turns them into numbers (experiments/measures.py), verdicts (experiments/claims.py, one
rule per claim) and files. A single run shows 'x (n = 1)', never '± 0'; a method without a
global model (FedSA, local-only) shows 'n/a' for the global metric and its personal models'.
"""
import os

import flax
import optax

from experiments import bench_round, image_study, report_lm, scales
from experiments.claims import (UNTESTABLE, claim_epochs, claim_lower, claim_personal, claim_rank,
                                claim_uplink)
from experiments.measures import curve, measure
from experiments.report_lm import fmt, model_name, seed_cis
from experiments.report_lm import ms as _ms
from fedgen.metrics import plots


def claims(m: dict) -> list[tuple]:
    """(claim, paper, ours, verdict, why) for the six claims."""
    u, ptb, c10 = m['uplink'], m['ptb'], m['cifar10']
    out = [('1. uplink', '> 99% less uplink than full FedAvg (Fig. 2)',
            f'{100 * u["reduction_whole"]:.2f}% (blocks only {100 * u["reduction_blocks"]:.2f}%)',
            *claim_uplink(u['reduction_whole'], u['reduction_blocks']))]
    if 'whole' in m:  # the final models on the whole split (validation when it was scored)
        split = m['whole']['splits'][0]
        e, f = m['whole']['fedgen_edge'][split], m['whole']['fedavg_full'][split]
        metric = f'{split} PPL ({m["whole"]["protocol"][f"{split}_words"]} words)'
    else:
        e, f, metric = ptb['fedgen_edge'], ptb['fedavg_full'], 'valid PPL'
    v = claim_lower(e['per_seed'], f['per_seed'], metric)
    out.append((f'2. PTB perplexity ({model_name(m["setup"])})',
                'lower PPL than full FedAvg, non-IID PTB (Fig. 3)',
                f'{fmt(e["mean"])} vs {fmt(f["mean"])}', *v))
    fm = m.get('fmnist', {'skipped': 'not run'})
    if 'skipped' in c10 and 'skipped' not in fm:  # the image claim on Fashion-MNIST
        e, f = fm['fd']['fedgen_edge'], fm['fd']['fedavg_full']
        out.append(('3. image quality (Fashion-MNIST)', 'lower FID than full FedAvg (Fig. 4)',
                    f'FD (classifier features), not FID: {fmt(e["mean"])} vs {fmt(f["mean"])}',
                    *claim_lower(e['per_seed'], f['per_seed'], 'FD (classifier features)')))
    elif 'skipped' in c10:
        out.append(('3. CIFAR-10 quality', 'lower FID (Fig. 4)', 'n/a', UNTESTABLE, c10['skipped']))
    else:
        v = claim_lower(c10['fedgen_edge']['per_seed'], c10['fedavg_full']['per_seed'],
                        'FD (classifier features)')
        out.append(
            ('3. CIFAR-10 quality', 'lower FID (Fig. 4)', 'FD (classifier features), not FID: '
             f'{fmt(c10["fedgen_edge"]["mean"])} vs {fmt(c10["fedavg_full"]["mean"])}', *v))
    pe, old = m['personal'], m.get('personal_window')
    shares = lambda x: ', '.join(f'{100 * s[0]:.1f}%' for s in x['per_seed'])
    out.append(('4. personalization', 'most clients gain (Fig. 5)',
                f'{shares(pe)} improve (document split)' +
                (f'; window split: {shares(old)}' if old else ''), *claim_personal(pe['per_seed'])))
    ranks = sorted(m['rank'])
    out.append(('5. LoRA rank', 'diminishing returns in r', f'ranks {ranks}',
                *claim_rank(ranks, [m['rank'][r]['per_seed'] for r in ranks])))
    es = sorted(m['epochs'])
    out.append(('6. local epochs', 'local epochs vs client drift trade-off', f'E {es}',
                *claim_epochs(es, [m['epochs'][e]['per_seed']
                                   for e in es], [m['epochs'][e]['drift_per_seed'] for e in es])))
    return out


def machine() -> str:
    """bench_round's machine line plus the library versions the report depends on."""
    return (f'{bench_round.machine()}; flax {flax.__version__}, optax {optax.__version__}')


def _ppl_panel(p: dict, title: str, backbone) -> dict:
    """A study's valid-PPL curves: the main groups (mean ± std over seeds) and every baseline
    with a global model (FedSA and local-only have none to plot)."""
    main = p['main']
    ppl = {f'{n} (mean ± std)': (*curve(main[n]['runs'], 'valid_ppl'), None) for n in main}
    ppl.update({
        n: (*curve([r], 'valid_ppl'), None)
        for n, r in p['baselines'].items() if r.get('has_global', True)
    })
    return dict(series=ppl,
                title=title,
                xlabel='round',
                ylabel='valid PPL',
                logy=True,
                reference=('backbone', backbone))


def figures(res: dict, m: dict, out: str) -> dict:
    """Writes every figure into ``out``; {name: file}. A panel's series are (x, y, std, labels).
    An ablation that was not run at this scale has no figure."""
    p, f, pb = res['ptb'], {}, m['uplink']['param_bytes']
    main = p['main']
    cum = {
        n: (*curve(main[k]['runs'][:1], 'up_bytes_total')[:2], None, None)
        for n, k in (('FedGen-Edge', 'fedgen_edge'), ('full FedAvg', 'fedavg_full'))
    }
    x, y = cum['full FedAvg'][:2]
    blocks = {**cum, 'full FedAvg': (x, [pb['blocks'] / pb['whole'] * v for v in y], None, None)}
    up = dict(xlabel='round', ylabel='cumulative uplink bytes', logy=True)
    ppl = [_ppl_panel(p, f'PTB, {model_name(m["setup"])}', m['ptb_backbone'])]
    if 'small_gpt' in m:
        ppl.append(
            _ppl_panel(res['small_gpt'], f'PTB, {model_name(m["small_gpt"]["setup"])}',
                       m['small_gpt']['ptb_backbone']))
    if 'skipped' not in m['brown']:
        ppl.append(
            dict(series={
                k: (*curve([r], 'valid_ppl'), None)
                for k, r in res['brown'].items()
            },
                 title='Brown corpus (natural clients)',
                 xlabel='round',
                 ylabel='valid PPL',
                 logy=True,
                 reference=('backbone', m['brown_backbone'])))
    todo = [('fig2', 'fig2_uplink.png', 'Fig. 2: uplink, FedGen-Edge vs full FedAvg', [
        dict(series=cum, title='whole model', **up),
        dict(series=blocks, title='full FedAvg counted on the transformer blocks only', **up)
    ]), ('fig3', 'fig3_ptb_ppl.png', 'Fig. 3: validation perplexity', ppl)]
    todo += ablation_figures(p, m)
    if 'skipped' not in res['cifar10']:
        fd = {k: (*curve([r], 'fd_classifier'), None) for k, r in res['cifar10'].items()}
        todo.append(('fig4', 'fig4_cifar_fd.png', 'Fig. 4: CIFAR-10-style data, Fréchet '
                     'distance in a home-trained classifier (not FID)',
                     [dict(series=fd, xlabel='round', ylabel='FD (classifier features)')]))
    for name, file, title, specs in todo:
        f[name] = file
        plots.panels(specs, os.path.join(out, file), title)
    pe, f['fig5'] = m['personal'], 'fig5_personalization.png'
    plots.gain_histogram(
        [r['gain_vs_global'] for r in p['personal']['rows'] if r['gain_vs_global'] is not None],
        os.path.join(out, f['fig5']), 'PPL(global) - PPL(personal)',
        f'Fig. 5: {100 * pe["share"]:.0f}% of {pe["clients"]} clients improve '
        f'(95% CI {100 * pe["ci"][0]:.0f}-{100 * pe["ci"][1]:.0f}%)')
    return f


def ablation_figures(p: dict, m: dict) -> list[tuple]:
    """(name, file, title, panels) of the rank, local-epoch and non-IID ablations that ran."""
    rk, es, al = sorted(m['rank']), sorted(m['epochs']), sorted(m['noniid'])
    out = []
    if rk:
        rank = ([m['rank'][r]['up_bytes_per_round'] for r in rk],
                [m['rank'][r]['mean'] for r in rk], [m['rank'][r]['std'] or 0
                                                     for r in rk], [f'r={r}' for r in rk])
        out.append(
            ('rank', 'rank_ablation.png', f'LoRA rank (alpha/r = {p["alpha_over_rank"]:g} fixed)', [
                dict(series={'FedGen-Edge': rank},
                     xlabel='uplink bytes per round',
                     ylabel='final valid PPL',
                     logx=True)
            ]))
    if es:
        ep = lambda key: {'FedGen-Edge': (es, [m['epochs'][e][key] for e in es], None, None)}
        out.append(('epochs', 'epoch_ablation.png', 'Local epochs vs client drift', [
            dict(series=ep('mean'), xlabel='local epochs E', ylabel='final valid PPL'),
            dict(series=ep('drift'), xlabel='local epochs E', ylabel='client drift (round mean)')
        ]))
    if al:
        alpha = {
            k: (al, [m['noniid'][a][k]['mean']
                     for a in al], [m['noniid'][a][k]['std'] or 0 for a in al], None)
            for k in ('fedgen_edge', 'fedavg_full')
        }
        out.append(('noniid', 'noniid_alpha.png', 'Non-IID strength', [
            dict(series=alpha,
                 xlabel='Dirichlet alpha (smaller = more non-IID)',
                 ylabel='final valid PPL',
                 logx=True)
        ]))
    return out


def markdown(res: dict, m: dict, figs: dict) -> str:
    s, sc, u = m['setup'], res['settings'], m['uplink']
    lines = [
        f'<!-- generated by: {res["command"]}; do not edit -->',
        f'# FedGen-Edge reproduction report ({res["scale"]} scale)', '',
        '| claim | paper | ours | verdict | why |', '|---|---|---|---|---|'
    ]
    lines += ['| ' + ' | '.join(c) + ' |' for c in claims(m)]
    lines += [
        '', f'Hardware: {machine()}. This invocation: {res["wall_s"] / 60:.1f} min (finished runs '
        'in the workdir are read back, not rerun).', '',
        f'Main study: {report_lm.scale_line(s)} Std over seeds with n - 1; a single run shows '
        '(n = 1).', '',
        scales.describe(res['scale'],
                        sc), '', f'Command: `{res["command"]}`', '', '## Fig. 2: uplink', '',
        f'Measured cumulative uplink after {s["rounds"]} rounds: FedGen-Edge {u["fedgen_edge"]:,} '
        f'B, full FedAvg {u["fedavg_full"]:,} B. The backbone is {u["param_bytes"]["whole"]:,} B, '
        f'of which the embedding leaves are {u["param_bytes"]["embedding"]:,} B '
        f'({100 * u["param_bytes"]["embedding"] / u["param_bytes"]["whole"]:.0f}%); the '
        'blocks-only panel counts full FedAvg as if it sent only the rest (the blocks and final '
        'norm).', '', f'![uplink]({figs["fig2"]})', '', '## Fig. 3: perplexity', '',
        f'### Main study: {model_name(s)}', '',
        report_lm.protocol(m), ''
    ] + report_lm.ptb_table(m['ptb'])
    lines += ['', f'Backbone (no federated training): {fmt(m["ptb_backbone"])}.', '']
    lines += [
        report_lm.lr_grid(m['lr_grid'], m['full_lr'], 'Full FedAvg',
                          **m.get('lr_tuning', {}).get('fedavg_full', {})), '',
        report_lm.lr_grid(m.get('edge_lr_grid', {}), m['edge_lr'], 'FedGen-Edge',
                          **m.get('lr_tuning', {}).get('fedgen_edge', {}))
    ]
    if 'whole' in m:
        lines += [''] + report_lm.whole_table(m['whole'])
    if 'small_gpt' in m:
        lines += report_lm.second_study(m['small_gpt'])
    lines += other_backbones(m)
    lines += [
        '', f'![ppl]({figs["fig3"]})', '',
        '## Fig. 4: CIFAR-10 (FD (classifier features), not FID)', ''
    ]
    if 'fig4' in figs:
        lines += ['| method | final FD (classifier features) |', '|---|---|']
        lines += [f'| {k} | {_ms(v)} |' for k, v in m['cifar10'].items()]
        lines += [
            '', 'FD (classifier features), key fd_classifier: the Fréchet distance in the '
            'features of a small classifier trained here; not comparable to published FID.', '',
            f'![fd]({figs["fig4"]})'
        ]
    else:
        lines.append(f'Not run: {m["cifar10"]["skipped"]}.')
    lines += image_study.markdown(m['fmnist'], 'fmnist_backbone_samples.png',
                                  'fmnist_class_share.png')
    pe = m['personal']
    lines += [
        '', '## Fig. 5: personalization', '',
        'The seed-0 global adapter of the main study\'s FedGen-Edge trained with a '
        'document-level local test split (group fedgen_edge_document) fine-tuned '
        f'E_p={s["personalize_epochs"]} epoch(s) on each client: {100 * pe["share"]:.1f}% of '
        f'{pe["clients"]} clients improve their local test PPL (bootstrap 95% CI '
        f'{100 * pe["ci"][0]:.1f}-{100 * pe["ci"][1]:.1f}%, 2000 resamples, seed 0); median gain '
        f'{fmt(pe["median_gain"])}. Every seed (share, 95% CI): {seed_cis(pe)}. Local test split: '
        'whole pseudo-documents per client (data.partition.local_test_unit=document), so no '
        'client tests on text it trained on.' +
        (f' The main runs\' window split (test windows drawn between the training windows of the '
         f'same passages, which share text with them) gives {seed_cis(m["personal_window"])}.'
         if 'personal_window' in m else ''), '', f'![gains]({figs["fig5"]})', ''
    ]
    lines += ablation_sections(res['ptb'], m, figs)
    return '\n'.join(lines) + '\n'


def ablation_sections(p: dict, m: dict, figs: dict) -> list[str]:
    """The rank, local-epoch and non-IID sections of the main study (a section whose ablation
    was not run at this scale says so)."""
    lines = ['## LoRA rank', '']
    if m['rank']:
        lines += [
            f'lora.alpha = {p["alpha_over_rank"]:g} r, so alpha / r (the effective step) is the '
            'same at every rank.', '', '| r | uplink B / round | final valid PPL |', '|---|---|---|'
        ]
        lines += [
            f'| {r} | {v["up_bytes_per_round"]:,.0f} | {_ms(v)} |'
            for r, v in sorted(m['rank'].items())
        ]
        lines += ['', f'![rank]({figs["rank"]})']
    else:
        lines.append('Not run at this scale.')
    lines += ['', '## Local epochs and client drift', '']
    if m['epochs']:
        lines += [
            'client drift = mean_k ||Delta_k - mean Delta|| / ||mean Delta|| over the clients '
            'of a round, averaged over rounds and seeds.', '',
            '| E | final valid PPL | client drift |', '|---|---|---|'
        ]
        lines += [f'| {e} | {_ms(v)} | {fmt(v["drift"])} |' for e, v in sorted(m['epochs'].items())]
        lines += ['', f'![epochs]({figs["epochs"]})']
    else:
        lines.append('Not run at this scale.')
    lines += ['', '## Non-IID strength', '']
    if m['noniid']:
        lines += ['| alpha | FedGen-Edge | full FedAvg |', '|---|---|---|']
        lines += [
            f'| {a} | {_ms(v["fedgen_edge"])} | {_ms(v["fedavg_full"])} |'
            for a, v in sorted(m['noniid'].items())
        ]
        lines += ['', f'![alpha]({figs["noniid"]})']
    else:
        lines.append('Not run at this scale.')
    return lines + ['']


def other_backbones(m: dict) -> list[str]:
    """Fig. 3's Brown table (its curves are a later panel of the figure)."""
    b = m['brown']
    lines = ['', '### Brown corpus, natural clients (configs/brown_fedgen_edge.py)', '']
    if 'skipped' in b:
        return lines + [f'Not run: {b["skipped"]}.']
    e = m['brown_eval']
    return lines + [
        f'Seed 0; word-level PPL of {e["words"]} validation words, window {e["window"]}, '
        f'stride {e["stride"]}. Frozen backbone (zero-shot): {fmt(m["brown_backbone"])}.', '',
        '| method | final valid PPL |', '|---|---|'
    ] + [f'| {k} | {_ms(v)} |' for k, v in b.items()]


def write(res: dict, out: str) -> dict:
    """REPORT.md and the figures into ``out``; returns the measured numbers and verdicts."""
    os.makedirs(out, exist_ok=True)
    m = measure(res)
    m['fmnist'] = image_study.measure(res.get('fmnist', {'skipped': 'not run'}))
    figs = figures(res, m, out)
    with open(os.path.join(out, 'REPORT.md'), 'w') as f:
        f.write(markdown(res, m, figs))
    return {**m, 'claims': claims(m), 'figures': figs, 'wall_s': res['wall_s']}
