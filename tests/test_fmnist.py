"""The image-diffusion task on Fashion-MNIST IDX files written here (never the apt package):
the config, the missing-data error, the training loss's flips and dropout, and a 2-round run of
configs/fmnist_fedgen_edge.py:tiny (flips + EMA) killed after round 1 and resumed (that
resume equals an unbroken run is tests/test_ema.py's engine-level check)."""
import copy
import csv
import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import write_image_folder
from configs import fmnist_fedgen_edge
from experiments import class_share, personal_grid, train, translate
from experiments.smoke_data import write_fashion_idx
from experiments import personalize as personal_exp
from fedgen.io import checkpoint
from fedgen.data import idx
from fedgen.data import images as im
from fedgen.models import unet
from fedgen.tasks import cifar10, image_generation


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    return write_fashion_idx(str(tmp_path_factory.mktemp('fmnist')))


def _config(source, arg='tiny'):
    c = fmnist_fedgen_edge.get_config(arg)
    c.data.source = source
    return c


def test_configs_and_missing_data_names_field_and_apt():
    for arg in ('', 'tiny', 'ci', 'full'):
        c = fmnist_fedgen_edge.get_config(arg)
        assert c.data.source == fmnist_fedgen_edge.FASHION_MNIST and c.data.flip
        assert c.model.image_channels == 1
        assert 0 < c.fed.ema_decay < 1
    with pytest.raises(ValueError, match='config argument'):
        fmnist_fedgen_edge.get_config('huge')
    with pytest.raises(ValueError) as e:
        im.load('fashion_mnist:/nonexistent/fashion-mnist', 'train')
    msg = str(e.value)
    assert msg.startswith('source=') and idx.FASHION_MNIST_APT in msg and '\n' not in msg


def test_loader_pads_28_to_32(source):
    data = im.load(source, 'test')
    assert data.images.shape == (30, 32, 32, 3) and data.class_names[-1] == 'Ankle boot'
    assert not data.images[:, :2].any() and not data.images[:, :, 30:].any()
    np.testing.assert_array_equal(data.images[..., 0], data.images[..., 2])


def test_training_loss_flips_and_dropout():
    """flip=False, dropout=0: the training loss is the evaluation loss (today's) exactly. Flips
    and dropout change the training loss only, deterministically given the step's rng. A U-Net
    on 8x8 images and one jit for every loss keep the compilation short."""
    from fedgen.models import diffusion
    sched = diffusion.make_schedule('linear', 50)
    cfg = unet.UNetConfig(channels=4,
                          channel_mult=(1, ),
                          num_res_blocks=1,
                          attn_resolutions=(),
                          groups=2,
                          image_size=8)
    m0, m1 = unet.UNet(cfg), unet.UNet(dataclasses.replace(cfg, dropout=0.5))
    fns = [
        cifar10.denoising_loss(m0, sched),
        cifar10.denoising_loss(m0, sched, train=True),
        cifar10.denoising_loss(m0, sched, flip=True, train=True),
        cifar10.denoising_loss(m1, sched, train=True),
        cifar10.denoising_loss(m1, sched)
    ]
    v = {'params': unet.init_params(cfg, jax.random.PRNGKey(0))}
    img = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    batch = {'images': img, 'weight': np.ones(4, np.float32)}
    keys = jnp.stack([jax.random.PRNGKey(5), jax.random.PRNGKey(6)])
    run = jax.jit(
        lambda keys: jnp.stack([jnp.stack([f(v, batch, k)[0] for k in keys]) for f in fns]))
    out = np.asarray(run(keys))
    np.testing.assert_array_equal(np.asarray(run(keys)), out)  # deterministic given the rng
    base, plain, flip, drop, drop_eval = out
    np.testing.assert_array_equal(plain, base)
    np.testing.assert_array_equal(drop_eval, base)  # evaluation: no dropout
    for got in (flip, drop):
        assert got[0] != base[0] and got[1] != got[0]


def test_task_wires_flip_and_dropout(source):
    """data.flip / model.dropout reach the task (its training loss and model) and are checked
    before any data is read."""
    c = _config(source)
    c.model.dropout = 0.25
    s = translate.spec(c).settings
    assert s.data.flip and cifar10.model_config(s).dropout == 0.25
    parts = cifar10.prepare_parts(s)
    assert parts.model_cfg.dropout == 0.25 and parts.eval_loss_fn is not parts.loss_fn
    assert cifar10.recipe(s)['public']['flip'] and cifar10.recipe(s)['model']['dropout'] == 0.25
    c.model.dropout = 1.0
    with pytest.raises(ValueError, match=r'model\.dropout'):
        cifar10.validate(translate.spec(c).settings)
    bad = dataclasses.replace(s, data=dataclasses.replace(s.data, flip=1))
    with pytest.raises(ValueError, match=r'data\.flip'):
        cifar10.validate(bad)
    bad = dataclasses.replace(s, data=dataclasses.replace(s.data, test_limit_per_class=-1))
    with pytest.raises(ValueError, match=r'^data\.test_limit_per_class must be an int >= 0'):
        cifar10.validate(bad)


def test_one_channel_model_reads_gray_and_samples_rgb(source, tmp_path):
    """model.image_channels=1: the U-Net sees channel 0 of the gray images, its samples come out
    R = G = B, the backbone recipe names it (and a 3-channel recipe stays as it was), and colour
    data or another channel count is refused."""
    c = _config(source)
    s = translate.spec(c).settings
    parts = cifar10.prepare_parts(s)
    assert parts.model_cfg.image_channels == 1 and cifar10.recipe(s)['model']['image_channels'] == 1
    three = dataclasses.replace(s, model=dataclasses.replace(s.model, image_channels=3))
    assert 'image_channels' not in cifar10.recipe(three)['model']
    variables = {'params': unet.init_params(parts.model_cfg, jax.random.PRNGKey(0))}
    gray = parts.pool['images'][:4]
    assert im.is_gray(gray) and not im.is_gray(gray + np.array([0, 1, 0], np.uint8))
    batch = {'images': gray, 'weight': np.ones(4, np.float32)}
    other = {**batch, 'images': np.concatenate([gray[..., :1], 255 - gray[..., 1:]], -1)}
    key = jax.random.PRNGKey(3)
    loss = jax.jit(parts.eval_loss_fn)
    assert float(loss(variables, other, key)[0]) == float(loss(variables, batch, key)[0])
    fake = image_generation.sample_images(parts, s, variables, jax.random.PRNGKey(1), 3)
    assert fake.shape == (3, 32, 32, 3) and fake.dtype == np.uint8 and im.is_gray(fake)
    assert fake.std() > 0
    colour = _config(write_image_folder(tmp_path))
    with pytest.raises(ValueError, match=r'^model\.image_channels=1 needs grayscale images'):
        cifar10.prepare_parts(translate.spec(colour).settings)
    c.model.image_channels = 2
    with pytest.raises(ValueError, match=r'^model\.image_channels must be 3 \(colour\) or 1'):
        cifar10.validate(translate.spec(c).settings)


def _state(workdir, config, step):
    m = checkpoint.manager(workdir, config.checkpoint.keep)
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    return m.restore(step, args=args)['state']


def _rows(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(x).items() if k != 'round_s'} for x in f]


@pytest.fixture(scope='module')
def tiny_run(source, tmp_path_factory):
    """configs/fmnist_fedgen_edge.py:tiny, 2 rounds: (config, workdir, summary)."""
    cfg = _config(source)
    cfg.eval.samples_every_eval = False
    work = str(tmp_path_factory.mktemp('fmnist_run') / 'run')
    return cfg, work, train.run(cfg, work)


def test_tiny_fmnist_run_with_ema(tiny_run):
    """A 2-round run: the checkpointed EMA follows ema_2 = d_1 ema_1 + (1 - d_1) w_2 with
    d_1 = min(0.9, 2/11), and the summary reports the raw and the EMA model (resume of the EMA
    state: tests/test_ema.py)."""
    cfg, work, summary = tiny_run
    for key in ('final_fd_classifier', 'final_fd_classifier_ema', 'final_test_eps_mse_ema'):
        assert np.isfinite(summary[key]), key
    assert os.path.isfile(os.path.join(work, 'samples_final.png'))
    rows = _rows(work)
    assert [r['round'] for r in rows] == [1, 2] and 'fd_classifier_ema' in rows[-1]
    s1, s2 = _state(work, cfg, 1), _state(work, cfg, 2)
    d = min(0.9, 2 / 11)
    for e1, w2, e2 in zip(*(jax.tree.leaves(x)
                            for x in (s1['aux']['ema'], s2['trainable'], s2['aux']['ema']))):
        np.testing.assert_allclose(e2, d * e1 + (1 - d) * w2, rtol=1e-5, atol=1e-7)
    assert jax.tree.structure(s2['aux']['ema']) == jax.tree.structure(s2['trainable'])


def test_own_classes_and_shares_by_hand():
    """O_k by hand; a model's 'images' carry its class, read back by the predictor; every model
    draws from the same keys; the summary counts the clients whose personal share is higher."""
    labels = np.array([0, 0, 0, 1, 2, 2, 2, 2, 2, 2])
    assert class_share.own_classes(labels, 4, 0.1).tolist() == [True, True, True, False]
    assert class_share.own_classes(labels, 4, 0.2).tolist() == [True, False, True, False]
    assert not class_share.own_classes(np.array([], np.int64), 4, 0.1).any()
    with pytest.raises(ValueError, match='--min_share'):
        class_share.own_classes(labels, 4, 0.0)
    keys = {}

    def sample(v, key):
        keys.setdefault(v['cls'], []).append(np.asarray(jax.random.key_data(key)).tolist())
        return np.full((3, 1, 1, 1), v['cls'], np.uint8)

    own = np.array([[True, False, False], [False, True, True]])
    rows, imgs = class_share.shares(sample, lambda x: x[:, 0, 0, 0].astype(int), {'cls': 2},
                                    lambda k: {'cls': k}, [0, 1], own, 5, 0)
    assert [(r['own_classes'], r['share_reference'], r['share_personal'])
            for r in rows] == [([0], 0.0, 1.0), ([1, 2], 1.0, 1.0)]
    assert imgs['reference'].shape == (5, 1, 1, 1) and len(keys[2]) == 2  # ceil(5 / 3) calls
    assert keys[0] == keys[1] == keys[2]
    s = class_share.summarize(rows)
    assert s['share_of_clients_higher'] == 0.5 and s['mean_share_reference'] == 0.5
    assert s['mean_share_personal'] == 1.0 and s['ci'][0] <= 0.5 <= s['ci'][1]


def test_class_share_of_a_personalized_run(tiny_run):
    """experiments.class_share on the personalized tiny run: the files, shares in [0, 1] over
    trained clients, and the same numbers when run again (seeded)."""
    _, work, _ = tiny_run
    personal_exp.main_run(None, work, 1, 0)
    out = class_share.run(work, 2, 3)
    assert 1 <= out['clients'] == len(out['rows']) <= 2 and out['reference'] == 'global'
    for r in out['rows']:
        assert 0.0 <= r['share_reference'] <= 1.0 and 0.0 <= r['share_personal'] <= 1.0
        assert r['own_classes']
    assert 0.0 <= out['classifier_test_accuracy'] <= 1.0
    for name in ('class_share.json', 'class_share.csv', 'class_share.png'):
        assert os.path.getsize(os.path.join(work, name)) > 0, name
    assert class_share.run(work, 2, 3) == out
    with pytest.raises(ValueError, match='--clients'):
        class_share.run(work, 0, 3)


def test_personal_grid_reproduces_the_runs_own_personalization(tiny_run, monkeypatch):
    """experiments.personal_grid on the tiny run: its setting equal to the run's personalization
    (lr, 2 steps) gives the same per-client own-class shares as class_share and the same local
    losses as personalization.csv, on the class-share clients only; finished settings are read
    back, not recomputed; bad grids are refused before any compute."""
    cfg, work, _ = tiny_run
    c = copy.deepcopy(cfg)
    c.personalize.max_steps = 2
    personal_exp.main_run(c, work, 1, 0)
    shares = class_share.run(work, 2, 3)
    with open(os.path.join(work, 'personalization.csv')) as f:
        losses = {int(r['client']): r for r in csv.DictReader(f)}
    lr = float(c.personalize.lr)
    out = personal_grid.run(work, [lr, 10 * lr], [2, 1], 2, 3, spec=translate.spec(c))
    names = [personal_grid.setting_key(x['lr'], x['max_steps']) for x in out['settings']]
    assert names == [
        f'lr {lr:g}, 2 steps', f'lr {lr:g}, 1 steps', f'lr {10 * lr:g}, 2 steps',
        f'lr {10 * lr:g}, 1 steps'
    ]
    same = out['settings'][0]
    assert [r['client'] for r in same['rows']] == [r['client'] for r in shares['rows']]
    for g, s in zip(same['rows'], shares['rows']):
        assert g['share_personal'] == s['share_personal']
        assert g['share_reference'] == s['share_reference']
        np.testing.assert_allclose(g['loss_personal'],
                                   float(losses[g['client']]['personal_loss']),
                                   rtol=1e-5)
        np.testing.assert_allclose(g['loss_global'],
                                   float(losses[g['client']]['global_loss']),
                                   rtol=1e-6)
    assert same['mean_share_reference'] == shares['mean_share_reference']
    for x in out['settings']:
        assert 0.0 <= x['conf_personal'] <= 1.0 and 0.0 <= x['loss_improved'] <= 1.0
    assert {x['conf_reference'] for x in out['settings']} == {same['conf_reference']}
    assert out['settings'][2]['rows'] != same['rows']  # a 10x lr moves the personal models
    for name in ('personal_grid.json', 'personal_grid.png', 'personal_grid.npz'):
        assert os.path.getsize(os.path.join(work, name)) > 0, name

    def never(*a, **k):
        raise AssertionError('a finished setting was recomputed')

    monkeypatch.setattr(personal_grid, 'one_setting', never)
    assert personal_grid.run(work, [lr, 10 * lr], [2, 1], 2, 3) == out  # read back
    os.remove(os.path.join(work, 'personal_grid.png'))  # redrawn from the kept samples
    assert personal_grid.run(work, [lr, 10 * lr], [2, 1], 2, 3) == out
    assert os.path.getsize(os.path.join(work, 'personal_grid.png')) > 0
    assert personal_grid.read(work, [lr, 10 * lr], [2, 1], 2, 3) == out  # computes nothing
    assert personal_grid.read(work, [lr, 10 * lr], [2, 1], 2, 4) is None  # other samples
    # A smaller grid is read from the kept settings, but its figure is drawn again: the one on
    # disk has the rows of the larger grid.
    assert personal_grid.read(work, [lr], [2], 2, 3) is None
    small = personal_grid.run(work, [lr], [2], 2, 3)
    assert small['settings'] == out['settings'][:1]
    assert personal_grid.read(work, [lr], [2], 2, 3) == small
    assert personal_grid.run(work, [lr, 10 * lr], [2, 1], 2, 3) == out  # all kept, redrawn
    with pytest.raises(ValueError, match='^--steps must be ints >= 1'):
        personal_grid.run(work, [lr], [0], 2, 3)
    with pytest.raises(ValueError, match='^--lrs must be numbers > 0'):
        personal_grid.run(work, [], [1], 2, 3)


def test_choose_takes_the_largest_share_within_the_loss_budget():
    """personal_grid.choose: the largest personal own-class share among settings whose local
    test loss rose by at most 1%; None when every setting costs more."""
    s = lambda share, loss: {
        'mean_share_personal': share,
        'mean_loss_global': 1.0,
        'mean_loss_personal': loss
    }
    grid = [s(0.35, 1.006), s(0.43, 1.003), s(0.48, 1.019), s(0.30, 0.99)]
    assert personal_grid.choose(grid) is grid[1]
    assert personal_grid.choose(grid, max_loss_rise=0.02) is grid[2]
    assert personal_grid.choose(grid[2:3]) is None


def test_backbone_quality_is_kept_whatever_personalization_says(tmp_path, monkeypatch):
    """image_study.backbone keys its kept quality check on what trains the models: a change of
    personalize.* reads it back, a change of lora.rank does not."""
    from experiments import image_study
    calls = []

    def fake_run(cache, where, *args, **kwargs):
        calls.append(where)
        os.makedirs(where)
        for name in ('fmnist_backbone.md', 'fmnist_backbone_samples.png'):
            with open(os.path.join(where, name), 'w') as f:
                f.write('x')
        return {'fd_gen': 1.0}

    monkeypatch.setattr(image_study.fmnist_backbone, 'run', fake_run)
    b = dict(steps=1, batch_size=1, lr=1e-3, samples=1, sample_steps=1, ema_decay=0.0)
    out = tmp_path / 'out'
    out.mkdir()
    run = lambda over: image_study.backbone(str(tmp_path / 'cache'), str(out), b, 'tiny', over, '')
    assert run({'personalize.lr': 1e-3, 'lora.rank': 4}) == {'fd_gen': 1.0}
    assert run({
        'personalize.lr': 1e-2,
        'personalize.max_steps': 32,
        'lora.rank': 4
    }) == {
        'fd_gen': 1.0
    }
    assert len(calls) == 1
    run({'personalize.lr': 1e-2, 'lora.rank': 8})
    assert len(calls) == 2 and os.path.isfile(out / 'fmnist_backbone.md')


def test_personal_grid_refuses_methods_that_keep_their_own_trees(tmp_path, monkeypatch):
    """A method whose personal models are its kept trees (Ditto, FedSA, local-only) has no
    fine-tuning budget: one line naming the method, before any fine-tuning or sampling."""
    kept = {
        'run': {
            'alg': types.SimpleNamespace(personal=lambda s: s),
            'method': types.SimpleNamespace(name='ditto')
        },
        'has_global': True
    }
    monkeypatch.setattr(class_share, 'setup', lambda *a, **k: kept)
    monkeypatch.setattr(personal_grid, 'one_setting', lambda *a, **k: pytest.fail('fine-tuned'))
    with pytest.raises(ValueError) as e:
        personal_grid.run(str(tmp_path), [1e-3], [8], 2, 3)
    assert "method 'ditto' keeps its own personal trees" in str(e.value)
    assert '\n' not in str(e.value)
