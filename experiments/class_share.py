"""Does each client's personalized image generator favour the client's own classes?

The image counterpart of Fig. 5, for a finished run on label-skewed clients (e.g.
configs/fmnist_fedgen_edge.py: per-label Dirichlet(alpha) skew) that experiments.personalize has
fine-tuned:

    python -m experiments.train --config configs/fmnist_fedgen_edge.py --workdir runs/fmnist
    python -m experiments.personalize --workdir runs/fmnist
    python -m experiments.class_share --workdir runs/fmnist --clients 8 --samples 64

Client k's own classes O_k are the classes that hold at least ``min_share`` of its training
images. The reference model R (the global model: the server's adapter that personalization
starts from, not its EMA; the backbone for methods without one) and the
client's personal model P_k each draw ``samples`` images from the same noise keys, and the run's
classifier (the fd_classifier network) labels them, c(x) = argmax logits(x):

    share_k(M) = |{i : c(x_i^M) in O_k}| / samples,    M in {R, P_k}

Reported per client: O_k, share_k(R), share_k(P_k); over the clients: the mean of both shares and
the fraction of clients with share_k(P_k) > share_k(R), with its bootstrap 95% CI over clients
(experiments.claims.bootstrap_share). The clients are the first ``clients`` trained clients with
a non-empty O_k, in index order (no selection by outcome). Writes <workdir>/class_share.json,
class_share.csv and class_share.png (per client: a row of reference samples above a row of
personal samples). The shares are only as good as the classifier: its test accuracy on real
images is in the json (``classifier_test_accuracy``).
"""
import csv
import json
import os

import jax
import matplotlib
import numpy as np
from absl import flags

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from experiments import backbones, translate  # noqa: E402
from experiments import personalize as personal_exp  # noqa: E402
from experiments.claims import bootstrap_share  # noqa: E402
from experiments.console import log, run_main  # noqa: E402
from fedgen.io import checkpoint  # noqa: E402
from fedgen.metrics import classifier  # noqa: E402


def own_classes(labels: np.ndarray, num_classes: int, min_share: float) -> np.ndarray:
    """bool [K]: the classes holding at least ``min_share`` of ``labels`` (one client's training
    labels, int [n_k]); all False for an empty client."""
    if not 0.0 < min_share <= 1.0:
        raise ValueError(f'--min_share must be in (0, 1], got {min_share}')
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    if counts.sum() == 0:
        return np.zeros(num_classes, bool)
    return counts >= min_share * counts.sum()


def draw(sample, variables, n: int, key) -> np.ndarray:
    """``n`` images from ``sample(variables, key_i)`` (each call returns a batch), keys
    fold_in(key, i) for i = 0, 1, ...: the same keys for every model."""
    out, i = [], 0
    while sum(len(o) for o in out) < n:
        out.append(np.asarray(sample(variables, jax.random.fold_in(key, i))))
        i += 1
    return np.concatenate(out)[:n]


def shares(sample,
           predict,
           reference,
           personal_of,
           clients: list,
           own: np.ndarray,
           n: int,
           seed: int,
           ref: np.ndarray | None = None) -> tuple[list[dict], dict]:
    """Per-client rows {client, own_classes, share_reference, share_personal} and the images
    {'reference': [n, ...], client: [n, ...]}.

    predict: uint8 images [n, H, W, C] -> int [n] classes; personal_of(k): client k's variables;
    own: bool [N, K] (:func:`own_classes` per client); ref: the reference model's images already
    drawn from the same key (``draw(sample, reference, n, PRNGKey(seed))``), or None to draw
    them here.
    """
    key = jax.random.PRNGKey(seed)
    ref = draw(sample, reference, n, key) if ref is None else ref
    ref_pred = predict(ref)
    rows, imgs = [], {'reference': ref}
    for k in clients:
        mine = draw(sample, personal_of(k), n, key)
        imgs[k] = mine
        rows.append({
            'client': int(k),
            'own_classes': [int(c) for c in np.flatnonzero(own[k])],
            'share_reference': float(np.mean(own[k][ref_pred])),
            'share_personal': float(np.mean(own[k][predict(mine)]))
        })
    return rows, imgs


def summarize(rows: list[dict]) -> dict:
    """Means of both shares and the fraction of clients whose personal share is higher, with
    its bootstrap 95% CI over clients."""
    up, lo, hi = bootstrap_share([r['share_personal'] > r['share_reference'] for r in rows])
    return {
        'clients': len(rows),
        'mean_share_reference': float(np.mean([r['share_reference'] for r in rows])),
        'mean_share_personal': float(np.mean([r['share_personal'] for r in rows])),
        'share_of_clients_higher': up,
        'ci': [lo, hi]
    }


def figure(rows: list[dict], imgs: dict, class_names, ref_name: str, cols: int, path: str) -> None:
    """Per client a panel: ``cols`` reference samples above ``cols`` personal ones (same keys),
    titled with the client's own classes and both shares."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(cols * 0.6, 1.45 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        pair = np.concatenate([imgs['reference'][:cols], imgs[r['client']][:cols]])
        h, w = pair.shape[1:3]
        strip = pair.reshape(2, cols, h, w, -1).transpose(0, 2, 1, 3,
                                                          4).reshape(2 * h, cols * w, -1)
        ax.imshow(strip.squeeze())
        ax.set_xticks([])
        ax.set_yticks([h / 2, 1.5 * h], [ref_name, 'personal'], fontsize=7)
        names = ', '.join(str(class_names[c]) for c in r['own_classes'])
        ax.set_title(
            f'client {r["client"]} ({names}): own-class share {ref_name} '
            f'{r["share_reference"]:.2f}, personal {r["share_personal"]:.2f}',
            fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setup(workdir: str, clients: int, min_share: float = 0.1, spec=None) -> dict:
    """What every class-share measurement of the finished run in ``workdir`` needs: spec, the
    restored run (experiments.personalize.restore), task, predict (uint8 images -> int [n]
    classes), own (bool [N, K]), picks (the client ids measured), reference (the global model's
    variables, or the backbone's for methods without one). ``spec``: the run's RunSpec with other
    personalize.* settings (default: that of <workdir>/config.json)."""
    if not (isinstance(clients, int) and clients >= 1):
        raise ValueError(f'--clients must be an int >= 1, got {clients!r}')
    spec = spec or translate.spec(personal_exp.load_config(workdir))
    r = personal_exp.restore(spec, workdir)
    task = r['task']
    if task.sample_kind != 'images' or task.classes is None:
        raise ValueError(f'--workdir {workdir}: class shares need an image task with classes, '
                         f'got task {task.name!r}')
    clf = backbones.auxiliaries(spec, task, workdir)['classifier']
    k_classes = len(task.classes)
    own = np.stack([own_classes(task.labels[i], k_classes, min_share) for i in task.client_train])
    trained = personal_exp.rounds_sampled(spec, r['step']) > 0
    picks = [k for k in range(len(own)) if trained[k] and own[k].any()][:clients]
    if not picks:
        raise ValueError(f'--workdir {workdir}: no trained client has training images')
    has_global = r['method'].has_global
    return dict(spec=spec,
                run=r,
                task=task,
                classifier=clf,
                predict=lambda x: np.asarray(classifier.logits(clf, x)).argmax(-1),
                own=own,
                picks=picks,
                has_global=has_global,
                reference={
                    **r['frozen'],
                    **r['state'].trainable
                } if has_global else r['backbone'])


def run(workdir: str, clients: int, samples: int, min_share: float = 0.1) -> dict:
    """Measures the finished, personalized run in ``workdir``; writes the files; returns the
    summary (with the rows under 'rows')."""
    if not (isinstance(samples, int) and samples >= 1):
        raise ValueError(f'--samples must be an int >= 1, got {samples!r}')
    st = setup(workdir, clients, min_share)
    spec, r, task, predict, own = st['spec'], st['run'], st['task'], st['predict'], st['own']
    personal = checkpoint.load_personal(workdir, r['step'], None)  # experiments.personalize
    picks, has_global, reference = st['picks'], st['has_global'], st['reference']
    personal_of = lambda k: {**r['frozen'], **jax.tree.map(lambda x: x[k], personal)}
    rows, imgs = shares(task.sample, predict, reference, personal_of, picks, own, samples,
                        spec.seed + 41)
    test = task.test
    out = {
        'method': spec.method.name,
        'round': int(r['step']),
        'reference': 'global' if has_global else 'backbone',
        'samples_per_model': samples,
        'min_share': min_share,
        'classifier_test_accuracy': float(np.mean(predict(test['images']) == test['labels'])),
        **summarize(rows), 'rows': rows
    }
    with open(os.path.join(workdir, 'class_share.json'), 'w') as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(workdir, 'class_share.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    figure(rows, imgs, task.classes, out['reference'], min(samples, 10),
           os.path.join(workdir, 'class_share.png'))
    log(f'own-class share over {out["clients"]} clients: {out["reference"]} '
        f'{out["mean_share_reference"]:.3f}, personal {out["mean_share_personal"]:.3f}; '
        f'{100 * out["share_of_clients_higher"]:.0f}% of clients higher (95% CI '
        f'{100 * out["ci"][0]:.0f}-{100 * out["ci"][1]:.0f}%); classifier test accuracy '
        f'{out["classifier_test_accuracy"]:.3f}; wrote {workdir}/class_share.{{json,csv,png}}')
    return out


def define_share_flags() -> None:
    """--clients, --samples and --min_share: which clients, how many samples per model, and what
    counts as a client's own class (this command's and experiments.personal_grid's)."""
    flags.DEFINE_integer('clients', 8, 'How many trained clients (the first, in index order).')
    flags.DEFINE_integer('samples', 64, 'Samples per model (reference and each personal one).')
    flags.DEFINE_float('min_share', 0.1, "A client's own classes: >= this share of its images.")


def define_flags() -> None:
    """This command's flags, defined only when it is the program."""
    flags.DEFINE_string('workdir', None, 'The finished, personalized run.', required=True)
    define_share_flags()


def main(argv):
    del argv
    f = flags.FLAGS
    run(f.workdir, f.clients, f.samples, f.min_share)


if __name__ == '__main__':
    define_flags()
    run_main(main)
