"""One language-model study of the reproduction report: FedGen-Edge against full-model FedAvg on
one backbone, with personalization and the ablations (experiments/reproduce.py runs one or two).

A study is a dict of experiments/scales.py (keys there): the configs configs/<config>_<method>.py
variant ``arg`` with the dotted overrides ``over``. In order:

- the backbone: pre-trained once (a 'local' model; cached, named by pretrain.backbone_path in
  every later run) or loaded (SmolLM2: pretrain.steps = 0, nothing cached);
- the client learning rates of full FedAvg (``full_lrs``) and FedGen-Edge (``edge_lrs``,
  optional): one seed-0 run per value, the lowest final valid metric chosen (ties: the first);
  without a grid the config's. A scale may pin them (``pinned_lrs``, {method: lr}, chosen once
  by its grid): the grid then runs only under experiments.reproduce --tune, and is otherwise
  shown as far as its runs are finished in the workdir;
- the main comparison: FedGen-Edge and full FedAvg, one experiments.sweep group each over
  ``seeds`` (full FedAvg one group per seed unless ``vmap_full``: R stacked copies of a 135M
  model and its Adam state do not fit a 24 GB machine); every other method of ``baselines``:
  one seed-0 run;
- claim 4 on both local test splits: 'window' (the main runs' first ``window_runs`` seeds,
  default len(personal_seeds)) and 'document' (a group over ``personal_seeds`` with
  data.partition.local_test_unit = 'document');
- LoRA rank r with lora.alpha = c r (c the base ratio), local epochs E and the Dirichlet alpha of
  the split (both methods): sweep groups; a setting equal to the base config's is the main group;
- with ``whole`` (eval.* overrides, and optionally 'splits': the splits to score, default valid
  and test): the final models of the main comparison and the zero-shot backbone scored again
  under that protocol (experiments.rescore; e.g. the whole splits when the per-round curve uses a
  named subset).

Client drift, mean_k ||Delta_k - mean Delta|| / ||mean Delta||, is on in every run
(fed.log_client_drift: a metric hook of the mean aggregator; no other number changes). A finished
run or group is read back, a killed one resumes (experiments.train, experiments.sweep).
"""
import copy
import json
import os

import jax

from experiments import backbones, compare, measures, rescore, sweep, train, translate, writers
from experiments import personalize as personal_exp
from experiments.console import log


def measured(config):
    """A copy of ``config`` with the client-drift metric hook on (fed.log_client_drift: the mean
    aggregator adds client_drift to every round's metrics; nothing else changes)."""
    c = copy.deepcopy(config)
    compare.set_field(c, 'fed.log_client_drift', True)
    return c


def read_rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(x) for x in f if x.strip()]


def single(config, run_dir: str) -> dict:
    """A finished run's {summary, rows, dir, spec}; runs (or resumes) it first unless finished.
    The config (with the drift hook, :func:`measured`) is translated here, once."""
    spec = translate.spec(measured(config))
    summary = writers.finished(spec.record, run_dir)
    if summary is None:
        log(f'--- run {run_dir}')
        summary = train.run(spec, run_dir)
    return {'summary': summary, 'rows': read_rows(run_dir), 'dir': run_dir, 'spec': spec}


def group(base,
          seeds,
          overrides: dict,
          workdir: str,
          name: str,
          cache: dict,
          compute: bool = True) -> dict | None:
    """One sweep group (seeds vmapped): {'runs': [single()-like per seed], 'overrides'}; a
    finished group is read back and a killed one resumes (experiments.sweep.run_group). ``cache``
    (the first run's config record and the seeds -> record) merges groups of identical configs.
    With ``compute`` False nothing runs: a group not finished under ``workdir`` gives None."""
    configs = [measured(sweep.with_overrides(base, overrides, s)) for s in seeds]
    specs = sweep.specs_of(configs)
    key = specs[0].record + str(list(seeds))
    if key in cache:
        return {**cache[key], 'overrides': overrides}
    dirs = sweep.run_dirs(name, configs, workdir)
    done = [writers.finished(sweep.resolved(s, d, workdir).record, d) for s, d in zip(specs, dirs)]
    if not compute and not all(done):
        return None
    if not all(done):
        log(f'--- sweep group {name} {overrides} seeds {list(seeds)}')
        sweep.run_group(name, configs, workdir, specs)
    runs = []
    for s, d in zip(specs, dirs):
        summary = writers.finished(sweep.resolved(s, d, workdir).record, d)
        runs.append({
            'summary': summary or {},
            'rows': read_rows(d) if summary else [],
            'dir': d,
            'spec': s
        })
    cache[key] = {'runs': runs, 'overrides': overrides}
    return cache[key]


def seed_groups(base, seeds, overrides: dict, workdir: str, name: str, cache: dict,
                vmap: bool) -> dict:
    """:func:`group` over ``seeds`` (vmapped), or with ``vmap`` False one group per seed (named
    <name>_seed<s>; a model whose R stacked copies would not fit in memory) merged into one."""
    if vmap:
        return group(base, seeds, overrides, workdir, name, cache)
    runs = [
        r for s in seeds
        for r in group(base, (s, ), overrides, workdir, f'{name}_seed{s}', cache)['runs']
    ]
    return {'runs': runs, 'overrides': overrides}


def backbone(config, workdir: str) -> tuple[str, dict]:
    """(pretrain.backbone_path for every run, the tree's byte counts measures.param_bytes): a
    'local' backbone is pre-trained (or found) once under ``workdir``; a loaded one (pretrain.steps
    = 0) keeps the config's path ('')."""
    spec = translate.spec(config)
    task = spec.prepare_task()
    params, info = backbones.pretrained(spec, task, workdir, jax.random.PRNGKey(spec.seed))
    path = os.path.abspath(info['source']) if spec.settings.pretrain.steps else ''
    return path, measures.param_bytes(params)


def personalization(spec, run_dir: str) -> dict:
    """Per-client gains of the finished run of RunSpec ``spec`` in ``run_dir`` with ``spec``'s
    personalize.* settings (cached in <run_dir>/gains.json, with those settings)."""
    path = os.path.join(run_dir, 'gains.json')
    want = personal_exp.settings(spec)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get('personalize') == want:
            return old
    restored = personal_exp.restore(spec, run_dir)
    _, rows, summary = personal_exp.run_personalize(spec, spec.personalize.epochs, restored)
    personal_exp.write(run_dir, rows, summary)
    out = {'rows': rows, 'summary': summary, 'personalize': want}
    with open(path, 'w') as f:
        json.dump(out, f)
    return out


def _failed(e: ValueError) -> dict:
    return {'summary': {}, 'rows': [], 'dir': '', 'error': str(e)}


def baselines(study: dict, over: dict, wd: str) -> dict:
    """Every method of study['baselines'], seed 0; one that fails (e.g. diverges) is recorded
    with its error and the rest go on. Methods without a global model carry their personal
    models' scores (:func:`personalization`)."""
    out = {}
    for m in study['baselines']:
        c = compare.method_config(study['config'], m, study['arg'], over)
        try:
            out[m] = single(c, os.path.join(wd, m))
        except ValueError as e:
            log(f'baseline {m} failed: {e}')
            out[m] = _failed(e)
            continue
        out[m]['has_global'] = out[m]['spec'].method.has_global
        if not out[m]['has_global']:
            out[m]['personal'] = personalization(out[m]['spec'], out[m]['dir'])
    return out


def tuned(study: dict,
          method: str,
          lrs,
          over: dict,
          wd: str,
          cache: dict,
          tune: bool = True) -> tuple[object, dict]:
    """(``method``'s config, {lr: seed-0 group named <method>_lr<lr>}). The client lr is
    study['pinned_lrs'][method] when the scale pins one, else the grid's lowest final valid PPL
    (ties: the first), else the config's. A pinned grid runs only with ``tune``; without, its
    finished runs are read back and the rest left out (nothing is computed)."""
    config = compare.method_config(study['config'], method, study['arg'], over)
    pinned = study.get('pinned_lrs', {}).get(method)
    grid, run_grid = {}, tune or pinned is None
    for lr in lrs:
        g = group(config, (0, ), {'fed.client_lr': lr}, wd, f'{method}_lr{lr:g}', cache, run_grid)
        if g is not None:
            grid[lr] = g
    score = lambda g: g['runs'][0]['summary'].get('final_valid_ppl', float('inf'))
    if pinned is not None:
        compare.set_field(config, 'fed.client_lr', pinned)
    elif grid:
        compare.set_field(config, 'fed.client_lr', min(grid, key=lambda lr: score(grid[lr])))
    return config, grid


def whole_scores(out: dict, whole: dict) -> dict:
    """{'backbone': zero-shot scores, method: [per-seed rescore 'final' dicts]} of the main
    comparison (claim 2's runs; the baselines keep the per-round protocol's numbers) under the
    eval overrides of ``whole`` on its 'splits' (default: valid and test); the shared backbone is
    scored once."""
    protocol = {k: v for k, v in whole.items() if k != 'splits'}
    splits = tuple(whole.get('splits', rescore.SPLITS))
    scores, first = {}, True
    for k, g in out['main'].items():
        scores[k] = []
        for r in g['runs']:
            got = rescore.rescore(r['dir'], protocol, backbone=first, splits=splits)
            if first:
                scores['backbone'], first = got['backbone'], False
            scores[k].append(got['final'])
    return scores


def section(study: dict, workdir: str, corpus: str = '', tune: bool = False) -> dict:
    """The study's runs and numbers (module docstring), under ``workdir``/<study['name']>;
    ``tune`` runs the grids of pinned learning rates (:func:`tuned`)."""
    over = dict(study['over'])
    if corpus:
        over.update({'data.source': corpus, 'data.verify_md5': False})
    wd = os.path.join(workdir, study['name'])
    os.makedirs(wd, exist_ok=True)
    edge = compare.method_config(study['config'], 'fedgen_edge', study['arg'], over)
    path, param_bytes = backbone(edge, wd)
    if path:
        over['pretrain.backbone_path'] = path
    cache, seeds = {}, study['seeds']
    full, grid = tuned(study, 'fedavg_full', study['full_lrs'], over, wd, cache, tune)
    edge, edge_grid = tuned(study, 'fedgen_edge', study.get('edge_lrs', ()), over, wd, cache, tune)
    out = {
        'main': {},
        'lr_grid': grid,
        'full_lr': full.fed.client_lr,
        'edge_lr_grid': edge_grid,
        'edge_lr': edge.fed.client_lr,
        'lr_tuning': {
            m: {
                'lrs': list(study.get(k, ())),
                'pinned': m in study.get('pinned_lrs', {})
            }
            for m, k in (('fedavg_full', 'full_lrs'), ('fedgen_edge', 'edge_lrs'))
        }
    }
    out['main']['fedgen_edge'] = group(edge, seeds, {}, wd, 'fedgen_edge', cache)
    out['main']['fedavg_full'] = seed_groups(full, seeds, {}, wd, 'fedavg_full', cache,
                                             study['vmap_full'])
    out['baselines'] = baselines(study, over, wd)
    runs = out['main']['fedgen_edge']['runs'][:study.get('window_runs', len(study['personal_seeds'])
                                                         )]
    out['personal_window_seeds'] = [personalization(r['spec'], r['dir']) for r in runs]
    doc = group(edge, study['personal_seeds'], {'data.partition.local_test_unit': 'document'}, wd,
                'fedgen_edge_document', cache)
    out['personal_seeds'] = [personalization(r['spec'], r['dir']) for r in doc['runs']]
    out['personal'] = out['personal_seeds'][0]
    ablations(study, edge, full, wd, cache, out)
    if study.get('whole'):
        out['whole'] = whole_scores(out, study['whole'])
        out['whole_protocol'] = study['whole']
    out['param_bytes'] = param_bytes
    out['setup'] = setup(edge, study)
    return out


def ablations(study: dict, edge, full, wd: str, cache: dict, out: dict) -> None:
    """out['rank'], out['epochs'], out['noniid']: the sweep groups of the three ablations; a
    setting equal to the base config's is the main group (all its seeds)."""
    main = out['main']
    ratio = edge.lora.alpha / edge.lora.rank
    out['alpha_over_rank'] = ratio
    out['rank'] = {
        r:
        main['fedgen_edge'] if r == edge.lora.rank else group(edge, study['rank_seeds'], {
            'lora.rank': r,
            'lora.alpha': ratio * r
        }, wd, f'rank{r}', cache)
        for r in study['ranks']
    }
    out['epochs'] = {
        e:
        main['fedgen_edge'] if e == edge.fed.local_epochs else group(
            edge, study['epoch_seeds'], {'fed.local_epochs': e}, wd, f'epochs{e}', cache)
        for e in study['epochs']
    }
    out['noniid'] = {}
    for a in study['alphas']:
        split = {'data.partition.alpha': a, 'data.partition.min_size': study['min_size']}
        out['noniid'][a] = {
            'fedgen_edge':
            group(edge, study['alpha_seeds'], split, wd, f'fedgen_edge_alpha{a}', cache),
            'fedavg_full':
            seed_groups(full, study['alpha_seeds'], split, wd, f'fedavg_full_alpha{a}', cache,
                        study['vmap_full'])
        }


def setup(edge, study: dict) -> dict:
    """The numbers the report's scale line states, from the base FedGen-Edge config."""
    fed = edge.fed
    return dict(config=study['config'],
                arg=study['arg'],
                num_clients=fed.num_clients,
                clients_per_round=fed.clients_per_round,
                rounds=fed.rounds,
                local_epochs=fed.local_epochs,
                max_steps_per_epoch=fed.max_steps_per_epoch,
                batch_size=fed.batch_size,
                seq_len=edge.data.seq_len,
                lora_rank=edge.lora.rank,
                lora_alpha=edge.lora.alpha,
                lora_targets=list(edge.lora.targets),
                model=edge.model.to_dict(),
                pretrain_steps=edge.pretrain.steps,
                personalize_epochs=edge.personalize.epochs,
                eval=edge.eval.to_dict())
