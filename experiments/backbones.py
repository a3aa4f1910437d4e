"""The frozen backbone and the evaluation networks of a run: load, or build once and cache.

    <workdir>/backbone/<recipe hash>/     the pre-trained backbone (Orbax), its recipe.json and
                                          pretrain.json (the pre-training's seconds and final loss)
    <cache>/<aux name>/<recipe hash>/     evaluation networks (e.g. the fd_classifier)

A recipe is what determines the tree (model, pre-training settings, public data, seed); its hash
is the cache key, so runs with the same recipe share the tree and any change rebuilds it. Every
cached tree carries a content checksum (fedgen.io.checkpoint); a cache that fails it is rebuilt,
while an explicit ``pretrain.backbone_path`` that fails it is an error. With ``pretrain.steps`` 0
the task's initial backbone (a loaded checkpoint such as SmolLM2) is used as is and not copied.
"""
import json
import os
import time

from experiments.console import log, progress
from fedgen.io import checkpoint
from fedgen.fl import pretrain
from fedgen.algorithms import optim


def load_cache(path: str, template, field: str):
    """The cached tree at ``path``, or None when there is none. A cache that fails its content
    checksum (or cannot be read) is moved aside with one warning line and rebuilt by the caller;
    it is never deleted."""
    if not os.path.isdir(path):
        return None
    try:
        return checkpoint.load_tree(path, template, field)
    except ValueError as e:
        moved = checkpoint.move_aside(path)
        log(f'warning: {field} {path} is unusable ({e}); moved to {moved}, rebuilding')
        return None


def pretrained(spec, task, workdir: str, rng) -> tuple[dict, dict]:
    """(params, info): the RunSpec's pretrain.backbone_path, or the workdir cache, or pre-trains
    the task's backbone on its public portion (seed ``spec.seed``) and caches it."""
    init, pre = task.init_backbone(rng), spec.settings.pretrain
    if pre.backbone_path:
        params = checkpoint.load_tree(pre.backbone_path, init, 'pretrain.backbone_path')
        return params, {'source': pre.backbone_path}
    if pre.steps == 0:  # a loaded checkpoint (or a random init): nothing to cache
        return init, {'source': task.info.get('model', {}).get('source', 'init'), 'pretrain': 0}
    path = os.path.join(workdir, 'backbone', pretrain.recipe_hash(task.recipe))
    got = load_cache(path, init, 'backbone cache')
    if got is not None:
        log(f'backbone: cached {path}')
        return got, {'source': path, **pretrain_record(path)}
    tx = optim.build(pre.opt, pre.lr, 'pretrain.opt', 'pretrain.lr')
    t0, params, loss = time.time(), init, float('nan')
    bar = progress(total=pre.steps, desc='pretrain', unit='step', every=max(1, pre.steps // 20))
    for done, loss, params in pretrain.train(task.loss_fn,
                                             tx,
                                             init,
                                             task.public,
                                             pre.steps,
                                             pre.batch_size,
                                             spec.seed,
                                             ema_decay=pre.ema_decay):
        bar.update(done - bar.n)
        bar.set_postfix(loss=f'{loss:.3f}')
    bar.close()
    record = {'pretrain_s': round(time.time() - t0, 1), 'pretrain_loss': float(loss)}
    checkpoint.save_tree(path, params)
    for name, tree in (('recipe.json', task.recipe), ('pretrain.json', record)):
        with open(os.path.join(path, name), 'w') as f:
            json.dump(tree, f, indent=1, sort_keys=True)
    return params, {'source': path, **record}


def pretrain_record(path: str) -> dict:
    """The pre-training's {'pretrain_s', 'pretrain_loss'} kept beside the cached backbone at
    ``path``, or {} for a cache written before the record was kept."""
    name = os.path.join(path, 'pretrain.json')
    if not os.path.isfile(name):
        return {}
    with open(name) as f:
        return json.load(f)


def cached(root: str, name: str, recipe: dict, build) -> dict:
    """A tree built by ``build()`` and cached under root/<name>/<recipe hash>."""
    path = os.path.join(root, name, pretrain.recipe_hash(recipe))
    got = load_cache(path, None, f'{name} cache')
    if got is not None:
        return got
    t0 = time.time()
    tree = build()
    checkpoint.save_tree(path, tree)
    log(f'{name}: built in {time.time() - t0:.1f}s, cached at {path}')
    return tree


def auxiliaries(spec, task, workdir: str) -> dict:
    """The task's evaluation networks (cached by recipe under the RunSpec's metrics.cache_dir or
    the workdir) and, when metrics.inception_path is set, the Inception-v3 weights for FID."""
    root = spec.cache_dir or workdir
    aux = {name: cached(root, name, net.recipe, net.build) for name, net in task.aux_nets.items()}
    if spec.inception_path:
        from fedgen.metrics import inception
        aux['inception'] = inception.load_params(spec.inception_path,
                                                 field='metrics.inception_path')
    return aux
