"""Scores a finished run under another evaluation protocol, e.g. the whole PTB splits.

    python -m experiments.rescore --workdir runs/smollm2_cpu --eval subset_lines=0 \
        --eval window=256 --eval stride=224 --eval batch_size=16 [--splits test]

A run's per-round curve is often taken on a named subset (``eval.subset_lines``) to save time;
its final numbers should cover the whole splits. This restores the run's final server state and
evaluates, on the validation and test splits of the run's task (or those named by ``--splits``)
with its ``eval`` section changed by ``--eval field=value``:

    backbone   the frozen pre-trained backbone (zero-shot),
    final      the final global model (W0 + dW for methods that fold adapters in),
    final_ema  its server EMA, with fed.ema_decay > 0.

Only ``eval.*`` fields can change (the model, data, split and training are the run's), each to a
value of the field's own type. Methods without a global model (FedSA, local-only) are refused:
they have nothing to score here (experiments.personalize scores their personal models).

The result is cached in <workdir>/rescore/<hash of the eval section>.json (written atomically):
a second call with the same protocol reads it back, evaluating only the (model, split) pairs it
lacks (the backbone, when an earlier call skipped it; a split an earlier call left out); returns
and prints it.
"""
import json
import os

from absl import flags

from experiments import backbones, translate, writers
from experiments import personalize as personal_exp
from experiments.console import log, run_main
from fedgen.fl import algorithm as base
from fedgen.fl import pretrain


def parse(pairs: list[str], section) -> dict:
    """{field: value} from 'field=value' strings, each value cast to the type of ``section``'s
    current value (bool from true/false); ValueError naming --eval on anything else."""
    out = {}
    for pair in pairs:
        name, sep, text = pair.partition('=')
        if not sep or name not in section:
            raise ValueError(f'--eval must be field=value with a field of the run\'s eval section '
                             f'({", ".join(sorted(section))}), got {pair!r}')
        kind = type(section[name])
        try:
            if kind is bool:
                if text.lower() not in ('true', 'false'):
                    raise ValueError(text)
                value = text.lower() == 'true'
            else:
                value = kind(text)
        except ValueError:
            raise ValueError(f'--eval {name} must be a {kind.__name__}, got {text!r}') from None
        out[name] = value
    return out


SPLITS = ('valid', 'test')


def rescore(workdir: str, overrides: dict, backbone: bool = True, splits: tuple = SPLITS) -> dict:
    """The module docstring's scores of the finished run in ``workdir`` with eval.<k> = v for
    every (k, v) of ``overrides`` (checked as the config is: one-line ValueErrors), on the
    ``splits`` (a non-empty subset of SPLITS); without the backbone's when ``backbone`` is False
    (runs that share a backbone score it once). Pairs (model, split) already in the protocol's
    cache file are read back, the missing ones evaluated and added."""
    if not splits or set(splits) - set(SPLITS) or len(set(splits)) != len(splits):
        raise ValueError(f'--splits must be distinct names among {list(SPLITS)}, got '
                         f'{list(splits)}')
    config = writers.run_config(workdir)
    if not os.path.isfile(os.path.join(workdir, 'summary.json')):
        raise ValueError(f'--workdir {workdir} has not finished (no summary.json): rescore needs '
                         'the final state')
    for k, v in overrides.items():
        if k not in config.eval:
            raise ValueError(f'--eval {k}: the run\'s eval section has no such field')
        config.eval[k] = v
    spec = translate.spec(config)
    if not spec.method.has_global:
        raise ValueError(f'--workdir {workdir}: fed.algorithm={spec.method.name!r} has no global '
                         'model to score (experiments.personalize scores its personal models)')
    protocol = config.eval.to_dict()
    path = os.path.join(workdir, 'rescore', pretrain.recipe_hash(protocol) + '.json')
    out = {'eval': protocol}
    if os.path.isfile(path):
        with open(path) as f:
            out = json.load(f)
    names = ['final'
             ] + (['final_ema'] if spec.ema_decay else []) + (['backbone'] if backbone else [])
    todo = [(n, s) for s in splits for n in names if f'{s}_ppl' not in out.get(n, {})]
    if not todo:
        return out
    r = personal_exp.restore(spec, workdir)
    task, state = r['task'], r['state']
    aux = backbones.auxiliaries(spec, task, workdir)
    models = {'final': {**r['frozen'], **state.trainable}}
    ema = base.ema_of(state)
    if ema is not None:
        models['final_ema'] = {**r['frozen'], **ema}
    if backbone:
        models['backbone'] = r['backbone']
    out['round'] = int(r['step'])
    for split in splits:
        evaluate = task.evaluator(split, aux)
        for name, variables in models.items():
            if (name, split) in todo:
                log(f'rescore: {name} on {split} ...')
                out.setdefault(name, {}).update(evaluate(variables))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(out, f, indent=1, sort_keys=True)
    os.replace(path + '.tmp', path)
    return out


def define_flags() -> None:
    """This command's flags, defined only when it is the program."""
    flags.DEFINE_string('workdir',
                        None,
                        'The finished run (experiments.train --workdir).',
                        required=True)
    flags.DEFINE_multi_string('eval', [], 'field=value: an eval.* field to change (repeat).')
    flags.DEFINE_list('splits', list(SPLITS), 'The splits to score (valid, test).')


def main(argv):
    del argv
    f = flags.FLAGS
    config = writers.run_config(f.workdir)
    out = rescore(f.workdir, parse(f.eval, config.eval), splits=tuple(f.splits))
    for name in ('backbone', 'final', 'final_ema'):
        if name in out:
            log(f'{name}: ' + ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}'
                                        for k, v in sorted(out[name].items())))


if __name__ == '__main__':
    define_flags()
    run_main(main)
