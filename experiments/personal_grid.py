"""How much personalization does an image generator need to favour a client's own classes, and
what does it cost the client's held-out data?

For a finished run whose clients fine-tune the global adapter (FedGen-Edge, full FedAvg, ...), on
the clients experiments.class_share measures (the first ``clients`` trained ones with own
classes), each setting s = (lr, max_steps) of a grid fine-tunes w_G per client with the run's
personalize.opt for personalize.epochs epochs of at most max_steps steps
(fedgen.fl.personalization.personalize, the same batches and keys as a run over every client):

    P_k^s = w_G after client k's local steps at (lr, max_steps)
    share_k(M) = |{i : c(x_i^M) in O_k}| / n              (experiments.class_share)
    conf(M)    = mean_i max softmax(logits(x_i^M))        (the classifier's confidence)
    loss_k(M)  = client k's local test denoising MSE      (same noise for every model)

for M in {R, P_k^s}, R the global model, x^M drawn from the same noise keys for every model.
Per setting: the class_share summary (mean shares, the fraction of clients whose share rises and
its bootstrap 95% CI), the mean local loss of both and the fraction of clients whose loss falls,
and both mean confidences. A large budget can push the share up by overfitting a few hundred
images: the loss on the client's held-out images and the confidence say whether the samples
still look like garments.

    python -m experiments.personal_grid --workdir runs/fmnist --lrs 1e-3,1e-2 --steps 8,32

Writes <workdir>/personal_grid.json (settings are kept as they finish and reused by a rerun with
the same clients, samples and min_share; a killed grid resumes; a grid whose settings are all
there and drawn is read back without restoring the run), personal_grid.npz (the figure's samples)
and personal_grid.png (for the first two clients, a row of global samples, then a row per
setting, same keys).
"""
import json
import os

import jax
import matplotlib
import numpy as np
from absl import flags

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from experiments import class_share, writers  # noqa: E402
from experiments.console import log, run_main  # noqa: E402
from fedgen.algorithms import optim  # noqa: E402
from fedgen.fl import personalization as personalize  # noqa: E402
from fedgen.metrics import classifier  # noqa: E402


def setting_key(lr: float, max_steps: int) -> str:
    """The name of one setting, e.g. 'lr 0.001, 8 steps'."""
    return f'lr {lr:g}, {max_steps} steps'


def check_grid(lrs, steps) -> list[tuple[float, int]]:
    """The settings (lr, max_steps) in grid order; ValueError naming --lrs / --steps."""
    if not lrs or any(not (isinstance(x, (int, float)) and x > 0) for x in lrs):
        raise ValueError(f'--lrs must be numbers > 0, got {lrs!r}')
    if not steps or any(not (isinstance(s, int) and s >= 1) for s in steps):
        raise ValueError(f'--steps must be ints >= 1, got {steps!r}')
    return [(float(lr), int(s)) for lr in lrs for s in steps]


def choose(settings: list[dict], max_loss_rise: float = 0.01) -> dict | None:
    """The setting with the largest mean personal own-class share among those whose mean local
    test loss is at most (1 + max_loss_rise) times the global model's; None if there is none."""
    ok = [
        s for s in settings
        if s['mean_loss_personal'] <= (1 + max_loss_rise) * s['mean_loss_global']
    ]
    return max(ok, key=lambda s: s['mean_share_personal']) if ok else None


def confidence(clf, images: np.ndarray) -> float:
    """Mean over ``images`` (uint8 [n, H, W, C]) of the classifier's largest softmax probability."""
    p = jax.nn.softmax(classifier.logits(clf, images), axis=-1)
    return float(np.mean(np.asarray(p).max(-1)))


def one_setting(st: dict, lr: float, max_steps: int, ref_imgs: np.ndarray, samples: int, seed: int,
                conf_reference: float) -> tuple[dict, dict]:
    """(summary with per-client rows, {client: images}) of one setting; ``st`` is
    class_share.setup's, ``ref_imgs`` the global model's samples from PRNGKey(``seed``) and
    ``conf_reference`` their :func:`confidence`."""
    spec, r, task, picks = st['spec'], st['run'], st['task'], st['picks']
    pc, fed = spec.personalize, spec.clients
    res = personalize.personalize(task.loss_fn,
                                  optim.build(pc.opt, lr, 'personalize.opt', '--lrs'),
                                  r['frozen'],
                                  r['state'].trainable,
                                  task.pool,
                                  task.client_train,
                                  task.client_test,
                                  epochs=pc.epochs,
                                  batch_size=fed.batch_size,
                                  seed=spec.seed,
                                  chunk=fed.chunk,
                                  eval_batch_size=fed.batch_size,
                                  max_steps=max_steps,
                                  backbone=r['backbone'],
                                  clients=picks)
    row_of = {k: i for i, k in enumerate(picks)}
    personal_of = lambda k: {**r['frozen'], **jax.tree.map(lambda x: x[row_of[k]], res.personal)}
    rows, imgs = class_share.shares(task.sample, st['predict'], None, personal_of, picks, st['own'],
                                    samples, seed, ref_imgs)
    for i, x in enumerate(rows):
        x.update(loss_global=float(res.global_loss[i]),
                 loss_personal=float(res.personal_loss[i]),
                 conf_personal=confidence(st['classifier'], imgs[x['client']]))
    g = np.array([x['loss_global'] for x in rows])
    p = np.array([x['loss_personal'] for x in rows])
    out = {
        'lr': lr,
        'max_steps': max_steps,
        **class_share.summarize(rows), 'mean_loss_global': float(np.nanmean(g)),
        'mean_loss_personal': float(np.nanmean(p)),
        'loss_improved': float(np.mean(p[np.isfinite(p)] < g[np.isfinite(p)])),
        'conf_reference': conf_reference,
        'conf_personal': float(np.mean([x['conf_personal'] for x in rows])),
        'rows': rows
    }
    imgs.pop('reference')
    return out, imgs


def figure(results: list[dict], ref_imgs: np.ndarray, kept: dict, class_names, picks: list,
           path: str) -> None:
    """For each client k in ``picks``: a row of global samples ``ref_imgs``, then one per setting
    (kept['<setting>|<k>'])."""
    n = len(results) + 1
    fig, axes = plt.subplots(len(picks),
                             1,
                             figsize=(len(ref_imgs) * 0.6, 0.62 * n * len(picks) + 0.4),
                             squeeze=False)
    h = ref_imgs.shape[1]
    names = ['global'] + [setting_key(s['lr'], s['max_steps']) for s in results]
    for ax, k in zip(axes[:, 0], picks):
        rows = [ref_imgs] + [kept[f'{name}|{k}'] for name in names[1:]]
        ax.imshow(np.concatenate([np.concatenate(list(r), axis=1) for r in rows]).squeeze(),
                  cmap='gray')
        ax.set_xticks([])
        ax.set_yticks([h * (i + 0.5) for i in range(n)], names, fontsize=6)
        row = next(x for x in results[0]['rows'] if x['client'] == k)
        ax.set_title(
            f'client {k} (own classes: '
            f'{", ".join(str(class_names[c]) for c in row["own_classes"])})',
            fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(workdir: str,
        lrs,
        steps,
        clients: int,
        samples: int,
        min_share: float = 0.1,
        spec=None) -> dict:
    """Measures every setting of the grid on the finished run in ``workdir`` (reusing those
    already in personal_grid.json); writes the files; returns {'key', 'settings': [summaries in
    grid order]}. ``spec``: the run's RunSpec, whose personalize.opt and .epochs are used (default:
    that of <workdir>/config.json)."""
    grid = check_grid(lrs, steps)
    if not (isinstance(samples, int) and samples >= 1):
        raise ValueError(f'--samples must be an int >= 1, got {samples!r}')
    path = os.path.join(workdir, 'personal_grid.json')
    key = {'clients': clients, 'samples': samples, 'min_share': min_share}
    done = _measured(path, key)
    out = read(workdir, lrs, steps, clients, samples, min_share)
    if out is not None:
        return out  # every setting measured and drawn: nothing to restore
    st = class_share.setup(workdir, clients, min_share, spec)
    if st['run']['alg'].personal is not None or not st['has_global']:
        raise ValueError(f'--workdir {workdir}: method {st["run"]["method"].name!r} keeps its own '
                         'personal trees; there is no fine-tuning budget to vary')
    task, spec = st['task'], st['spec']
    seed = spec.seed + 41  # class_share's keys: the same global samples
    ref_imgs = class_share.draw(task.sample, st['reference'], samples, jax.random.PRNGKey(seed))
    conf_reference = confidence(st['classifier'], ref_imgs)
    show, cols = st['picks'][:2], 10
    kept_path = os.path.join(workdir, 'personal_grid.npz')  # the figure's rows
    kept = dict(np.load(kept_path)) if done and os.path.isfile(kept_path) else {}
    for lr, s in grid:
        name = setting_key(lr, s)
        if name in done and all(f'{name}|{k}' in kept for k in show):
            continue
        done[name], imgs = one_setting(st, lr, s, ref_imgs, samples, seed, conf_reference)
        kept.update({f'{name}|{k}': imgs[k][:cols] for k in show})
        d = done[name]
        log(f'{name}: own-class share {d["mean_share_reference"]:.3f} -> '
            f'{d["mean_share_personal"]:.3f} ({100 * d["share_of_clients_higher"]:.0f}% of '
            f'{d["clients"]} clients higher); local denoising loss {d["mean_loss_global"]:.5f} -> '
            f'{d["mean_loss_personal"]:.5f} ({100 * d["loss_improved"]:.0f}% improve); '
            f'confidence {d["conf_reference"]:.3f} -> {d["conf_personal"]:.3f}')
        np.savez(kept_path + '.tmp.npz', **kept)
        os.replace(kept_path + '.tmp.npz', kept_path)
        writers.write_atomic(path,
                             json.dumps({
                                 'key': key,
                                 'settings': list(done.values())
                             }, indent=1))
    out = {'key': key, 'settings': [done[setting_key(lr, s)] for lr, s in grid]}
    figure(out['settings'], ref_imgs[:cols], kept, task.classes, show,
           os.path.join(workdir, 'personal_grid.png'))
    writers.write_atomic(
        path,  # every setting measured so far, and the figure's
        json.dumps(
            {
                'key': key,
                'settings': list(done.values()),
                'drawn': [setting_key(*g) for g in grid]
            },
            indent=1))
    return out


def _measured(path: str, key: dict) -> dict:
    """{setting_key: summary} of personal_grid.json at ``path`` when it was made with ``key``."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    if old['key'] != key:
        return {}
    return {setting_key(s['lr'], s['max_steps']): s for s in old['settings']}


def read(workdir: str, lrs, steps, clients: int, samples: int, min_share: float = 0.1):
    """:func:`run`'s result read back without computing anything: None unless every setting of
    the grid is in <workdir>/personal_grid.json with this key and personal_grid.png was drawn
    with exactly these settings."""
    grid = check_grid(lrs, steps)
    key = {'clients': clients, 'samples': samples, 'min_share': min_share}
    path = os.path.join(workdir, 'personal_grid.json')
    done = _measured(path, key)
    if not all(setting_key(*g) in done for g in grid):
        return None
    with open(path) as f:
        drawn = json.load(f).get('drawn')
    if drawn != [setting_key(*g) for g in grid]:
        return None
    if not os.path.isfile(os.path.join(workdir, 'personal_grid.png')):
        return None
    return {'key': key, 'settings': [done[setting_key(*g)] for g in grid]}


def define_flags() -> None:
    """This command's flags, defined only when it is the program."""
    flags.DEFINE_string('workdir', None, 'The finished run.', required=True)
    flags.DEFINE_list('lrs', ['1e-3', '1e-2'], 'Personalization learning rates.')
    flags.DEFINE_list('steps', ['8', '32'], 'Personalization step caps (max_steps).')
    class_share.define_share_flags()


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        lrs, steps = [float(x) for x in f.lrs], [int(x) for x in f.steps]
    except ValueError as e:
        raise ValueError(f'--lrs must be numbers and --steps ints: {e}') from None
    run(f.workdir, lrs, steps, f.clients, f.samples, f.min_share)


if __name__ == '__main__':
    define_flags()
    run_main(main)
