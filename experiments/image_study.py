"""The reproduction report's image study: a DDPM backbone pre-trained on Fashion-MNIST, FedGen-Edge
against full-model FedAvg on label-skewed clients (claim 3 where CIFAR-10 is not run), and
whether each client's personalized generator favours its own classes.

A study is the ``fmnist`` entry of an experiments/scales.py scale (None: not run), keys:
arg and over (configs/fmnist_<method>.py:<arg> with dotted overrides), backbone (pre-training
steps, batch_size, lr, ema_decay; samples and sample_steps of its quality check), seeds (both
methods, one vmapped sweep group each), class_clients and class_samples (the own-class share's
clients per seed and samples per model), personal_grid (optional: {lrs, steps}, the
personalization budgets experiments.personal_grid compares). In order:

1. the backbone (experiments.fmnist_backbone.run): pre-trained once on the server's public images
   and cached under <workdir>/fmnist/backbone/backbone/<recipe hash>, its N DDIM samples scored
   against real test images in the features of the project's classifier (FD, the real-vs-real
   floor, their ratio; kept under <workdir>/fmnist/backbone/quality) and drawn as a grid into
   the report directory;
2. FedGen-Edge and full FedAvg from that backbone, over ``seeds``: final fd_classifier (and of
   the server EMA) on the validation images; uplink bytes per client and round;
3. per FedGen-Edge seed: experiments.personalize (every client fine-tunes the global adapter),
   then experiments.class_share: share_k(M) = |{i : c(x_i^M) in O_k}| / n for the global model
   and client k's personal one from the same noise keys, O_k the classes holding >= 10% of k's
   images, c the classifier's argmax; the fraction of clients whose personal share is higher,
   with its bootstrap 95% CI over clients; then experiments.personal_grid over the
   personal_grid budgets on the same clients and noise keys (shares, local test loss, the
   classifier's confidence in the samples). The grid chose the scale's personalize.* budget, so
   it runs under experiments.reproduce --tune; otherwise a finished grid is read back.

Every run, personalization, class share and grid setting is read back when finished (a killed
one resumes). The runs are reused whatever personalize.* says (writers.POST_RUN); the
personalization and class shares are keyed on those settings and redone when they change.
"""
import json
import os
import shutil

from experiments import class_share, compare, fmnist_backbone, lm_study, personal_grid, writers
from experiments import personalize as personal_exp
from experiments.console import log
from experiments.measures import stats
from experiments.report_lm import fmt, ms
from fedgen.data import idx
from fedgen.fl import pretrain

METHODS = ('fedgen_edge', 'fedavg_full')


def section(st: dict | None,
            workdir: str,
            out: str,
            source: str = '',
            command: str = '',
            tune: bool = False) -> dict:
    """The study's results (module docstring) under <workdir>/fmnist; the backbone's grid goes
    into ``out``; ``source`` replaces data.source (the smoke scale's IDX files); ``tune`` runs
    the personalization-budget grid (:func:`grid`). Returns {'skipped': why} when the scale does
    not run it or the data is missing."""
    if st is None:
        return {'skipped': 'not run at this scale'}
    over = dict(st['over'])
    if source:
        over['data.source'] = source
    path = over.get('data.source', 'fashion_mnist:' + idx.FASHION_MNIST_DIR).split(':', 1)[1]
    if not os.path.isdir(path):
        return {'skipped': f'{path} not found ({idx.FASHION_MNIST_APT})'}
    wd = os.path.join(workdir, 'fmnist')
    b = st['backbone']
    cache = os.path.abspath(os.path.join(wd, 'backbone'))
    bb = backbone(cache, out, b, st['arg'], over, command)
    over.update({'pretrain.backbone_path': bb['source'], 'metrics.cache_dir': cache})
    res = {'backbone': bb, 'runs': {}, 'class_share': [], 'grid': []}
    cache_groups = {}
    for m in METHODS:
        c = compare.method_config('fmnist', m, st['arg'], over)
        res['runs'][m] = lm_study.group(c, st['seeds'], {}, wd, m, cache_groups)
    for r in res['runs']['fedgen_edge']['runs']:
        res['class_share'].append(
            personal_share(r['spec'], r['dir'], st['class_clients'], st['class_samples']))
        if st.get('personal_grid'):
            res['grid'].append(
                grid(r['spec'], r['dir'], st['personal_grid'], st['class_clients'],
                     st['class_samples'], tune))
    first = res['runs']['fedgen_edge']['runs'][0]['dir']
    shutil.copyfile(os.path.join(first, 'class_share.png'),
                    os.path.join(out, 'fmnist_class_share.png'))
    if res['grid'] and res['grid'][0] is not None:
        shutil.copyfile(os.path.join(first, 'personal_grid.png'),
                        os.path.join(out, 'fmnist_personal_grid.png'))
    return res


def backbone(cache: str, out: str, b: dict, arg: str, over: dict, command: str) -> dict:
    """experiments.fmnist_backbone.run's results for the scale's backbone entry ``b``, its page
    and grid copied into ``out``; the first call's files and results are kept in
    <cache>/quality/<hash of b, arg and over without its POST_RUN fields> and read back later."""
    trained = {  # what the check depends on: not the post-training settings
        k: v
        for k, v in over.items()
        if not any(k == f or k.startswith(f + '.') for f in writers.POST_RUN)
    }
    key = pretrain.recipe_hash({'backbone': b, 'arg': arg, 'over': trained})
    kept = os.path.join(cache, 'quality', key)
    path = os.path.join(kept, 'quality.json')
    if not os.path.isfile(path):
        res = fmnist_backbone.run(cache, kept + '.tmp', b['steps'], b['batch_size'], b['lr'],
                                  b['samples'], b['sample_steps'], command, b['ema_decay'], arg,
                                  over)
        with open(os.path.join(kept + '.tmp', 'quality.json'), 'w') as f:
            json.dump(res, f, indent=1)
        shutil.rmtree(kept, ignore_errors=True)
        os.replace(kept + '.tmp', kept)
    for name in ('fmnist_backbone.md', 'fmnist_backbone_samples.png'):
        shutil.copyfile(os.path.join(kept, name), os.path.join(out, name))
    with open(path) as f:
        return json.load(f)


def personal_share(spec, run_dir: str, clients: int, samples: int) -> dict:
    """experiments.personalize (with RunSpec ``spec``'s personalize.* settings) then
    experiments.class_share of the finished run in ``run_dir``, read back from
    <run_dir>/class_share.json when both were done with these settings, clients and samples: the
    class-share summary with its per-client rows, plus the personalization's share of clients
    whose local denoising loss improves on the global model's (loss_improved)."""
    path = os.path.join(run_dir, 'class_share.json')
    key = {
        'personalize': personal_exp.settings(spec),
        'request': {
            'clients': clients,
            'samples': samples
        }
    }
    old = {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    if {k: old.get(k) for k in key} != key:
        log(f'--- personalize and class share {run_dir}')
        personal_exp.main_spec(spec, run_dir, None, 0)
        old = {**class_share.run(run_dir, clients, samples), **key}
        with open(path, 'w') as f:
            json.dump(old, f, indent=1)
    with open(os.path.join(run_dir, 'personalization.json')) as f:
        old['loss_improved'] = json.load(f)['vs_global']['share_improved']
    return old


def grid(spec, run_dir: str, g: dict | None, clients: int, samples: int, tune: bool) -> dict | None:
    """experiments.personal_grid on the finished run of RunSpec ``spec`` in ``run_dir`` over the
    scale's personal_grid entry ``g`` ({lrs, steps}; None: not run). It chose the scale's
    personalize.* budget, so it runs only with ``tune``; without, a finished grid is read back
    and a missing one gives None."""
    if not g:
        return None
    if not tune:
        return personal_grid.read(run_dir, g['lrs'], g['steps'], clients, samples)
    return personal_grid.run(run_dir, g['lrs'], g['steps'], clients, samples, spec=spec)


def measure(res: dict) -> dict:
    """The numbers the report states (JSON-safe)."""
    if 'skipped' in res:
        return {'skipped': res['skipped']}
    keep = ('fd_gen', 'fd_floor', 'ratio', 'conf_gen', 'conf_real', 'class_tv',
            'classifier_test_acc', 'n', 'sample_steps', 'steps', 'batch_size', 'lr', 'ema_decay',
            'pretrain_s', 'public_images', 'source')
    runs = res['runs']
    first = lambda m: runs[m]['runs'][0]['summary']
    return {
        'backbone': {
            k: res['backbone'].get(k)
            for k in keep
        },
        'fd': {
            m: stats(runs[m], 'fd_classifier')
            for m in METHODS
        },
        'fd_ema': {
            m: stats(runs[m], 'fd_classifier_ema')
            for m in METHODS
        },
        'backbone_fd':
        first('fedgen_edge').get('backbone_fd_classifier'),
        'up_bytes': {
            m: first(m).get('up_bytes_per_client_round')
            for m in METHODS
        },
        'rounds':
        first('fedgen_edge').get('rounds'),
        'class_share': [{
            k: v
            for k, v in s.items() if k != 'rows'
        } for s in res['class_share']],
        'grid': [[{
            k: v
            for k, v in x.items() if k != 'rows'
        } for x in g['settings']] if g else None for g in res.get('grid', [])],
        'personalize':
        res['class_share'][0].get('personalize'),
        'seeds':
        len(runs['fedgen_edge']['runs'])
    }


def setting_key(s: dict) -> str:
    return personal_grid.setting_key(s['lr'], s['max_steps'])


def personalized(m: dict) -> str:
    """' Each client's personal model: ...' (the personalize.* settings of the table below), or
    '' when they were not recorded."""
    p = m.get('personalize')
    if not p:
        return ''
    cap = f' of at most {p["max_steps"]} steps' if p['max_steps'] else ''
    return (f' Each client\'s personal model: the global adapter fine-tuned on its own images for '
            f'{p["epochs"]} local epoch(s){cap} with {p["opt"]} at lr {p["lr"]:g}.')


def grid_markdown(grids: list, png: str) -> list[str]:
    """The personalization-budget table (experiments/personal_grid.py), one row per setting and
    seed (a seed without a finished grid is left out), and its figure; nothing when the scale
    has no grid."""
    if not grids:
        return []
    if grids[0] is None:
        return [
            '', 'The personalization budget above was chosen by experiments.personal_grid '
            '(`python -m experiments.reproduce --tune` runs it); its grid is not finished in '
            'this workdir.'
        ]
    seeds = [(i, g) for i, g in enumerate(grids) if g is not None]
    lines = [
        '', 'How much fine-tuning does a client need? The same clients and noise keys, each '
        'setting fine-tuning the global adapter for the local epochs above, of at most `steps` '
        'steps each, at `lr` (experiments/personal_grid.py). The local denoising MSE is on the '
        'client\'s held-out images (the same noise for both models); the confidence is the '
        'classifier\'s '
        'mean top-class probability on the samples, a proxy for how recognisable they are.', '',
        '| lr | steps | seed | own-class share, global -> personal | clients higher (95% CI) | '
        'local denoising MSE, global -> personal | clients whose MSE falls | '
        'confidence, global -> personal |', '|---|---|---|---|---|---|---|---|'
    ]
    for j in range(len(grids[0])):
        for i, g in seeds:
            x = g[j]
            lines.append(f'| {x["lr"]:g} | {x["max_steps"]} | {i} | '
                         f'{x["mean_share_reference"]:.3f} -> {x["mean_share_personal"]:.3f} | '
                         f'{100 * x["share_of_clients_higher"]:.0f}% ({100 * x["ci"][0]:.0f}-'
                         f'{100 * x["ci"][1]:.0f}%) | {x["mean_loss_global"]:.5f} -> '
                         f'{x["mean_loss_personal"]:.5f} | {100 * x["loss_improved"]:.0f}% | '
                         f'{x["conf_reference"]:.3f} -> {x["conf_personal"]:.3f} |')
    picks = []
    for i, g in seeds:
        c = personal_grid.choose(g)
        picks.append(f'seed {i}: ' + (setting_key(c) if c else 'none'))
    lines += [
        '', 'The rule that chose the personalization above (experiments.personal_grid.choose): '
        'the largest own-class share whose mean held-out denoising MSE stays within 1% of the '
        f'global model\'s. It picks {"; ".join(picks)}.'
    ]
    return lines + [
        '', 'Seed 0, the first two clients: a row of global samples, then one per setting.', '',
        f'![personalization budget]({png})'
    ]


def markdown(m: dict, grid: str, shares_png: str) -> list[str]:
    """The report's Fashion-MNIST section (a list of markdown lines)."""
    lines = ['', '## Fashion-MNIST: a pre-trained image generator, personalized', '']
    if 'skipped' in m:
        return lines + [f'Not run: {m["skipped"]}.']
    b = m['backbone']
    ema = f', weight EMA {b["ema_decay"]:g}' if b['ema_decay'] else ''
    pre = (f'pre-trained here in {b["pretrain_s"]:.0f} s'
           if b['pretrain_s'] is not None else 'read back from its cache')
    lines += [
        f'Backbone: the U-Net of configs/fmnist_fedgen_edge.py, {b["steps"]} Adam steps of '
        f'{b["batch_size"]} images at lr {b["lr"]:g}{ema} on the {b["public_images"]} public '
        f'train images ({pre}). Its {b["n"]} DDIM samples ({b["sample_steps"]} steps) against '
        'real test images, in the features of the classifier trained here (test accuracy '
        f'{100 * b["classifier_test_acc"]:.1f}%): FD (classifier features) '
        f'{b["fd_gen"]:.4g}, real-vs-real floor {b["fd_floor"]:.4g}, ratio '
        f'**{b["ratio"]:.3g}**; TV of the predicted-class histogram from uniform '
        f'{b["class_tv"]:.3f}.', '', f'![backbone samples]({grid})', '',
        '| method | final FD (classifier features) | server EMA | uplink per client per round |',
        '|---|---|---|---|'
    ]
    for k in METHODS:
        lines.append(f'| {k} | {ms(m["fd"][k])} | {ms(m["fd_ema"][k])} | '
                     f'{m["up_bytes"][k]:,} B |')
    lines += [
        '', f'Both from the backbone above (FD {fmt(m["backbone_fd"])} on the same validation '
        f'images), {m["rounds"]} rounds, label-skewed clients.{personalized(m)}', '',
        '| seed | clients | own-class share, global | personal | clients higher (95% CI) | '
        'clients whose local denoising loss improves |', '|---|---|---|---|---|---|'
    ]
    for i, s in enumerate(m['class_share']):
        lines.append(f'| {i} | {s["clients"]} | {s["mean_share_reference"]:.3f} | '
                     f'{s["mean_share_personal"]:.3f} | '
                     f'{100 * s["share_of_clients_higher"]:.0f}% ({100 * s["ci"][0]:.0f}-'
                     f'{100 * s["ci"][1]:.0f}%) | {100 * s["loss_improved"]:.0f}% |')
    lines += [
        '', 'Own-class share: the share of a model\'s samples that the classifier assigns to the '
        'client\'s own classes (those holding at least 10% of its images), global model vs the '
        'client\'s personalized one from the same noise keys (experiments/class_share.py). '
        'Per client below, seed 0: a row of global samples above a row of personal ones.', '',
        f'![own-class share]({shares_png})'
    ]
    return lines + grid_markdown(m.get('grid'), 'fmnist_personal_grid.png')
