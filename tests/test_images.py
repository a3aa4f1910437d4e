"""Tests for fedgen.data.images: every format is written tiny into tmp_path by the test itself."""
import gzip
import io
import os
import pickle
import sys
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from fedgen.data import images as im
from fedgen.data import partition

RNG = np.random.default_rng(0)


def _records(n, seed):
    """n CIFAR binary records (label byte + 3072 CHW bytes), plus the expected HWC images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    chw = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    rec = np.concatenate([labels[:, None], chw.reshape(n, -1)], axis=1)
    return rec, labels, chw


def _write_bin(root, sizes=(3, 2, 4, 1, 2), test=3, meta=True):
    d = root / 'cifar-10-batches-bin'
    d.mkdir(parents=True)
    out = {'train': [], 'test': []}
    for i, n in enumerate(sizes):
        rec, labels, chw = _records(n, i)
        rec.tofile(d / f'data_batch_{i + 1}.bin')
        out['train'].append((rec, labels, chw))
    rec, labels, chw = _records(test, 99)
    rec.tofile(d / 'test_batch.bin')
    out['test'].append((rec, labels, chw))
    if meta:
        (d / 'batches.meta.txt').write_text('\n'.join(f'c{i}' for i in range(10)) + '\n\n')
    return d, out


def test_cifar_binary(tmp_path):
    d, out = _write_bin(tmp_path)
    for split in ('train', 'test'):
        for source in (str(tmp_path), str(d)):  # the parent, or the batches folder itself
            data = im.load(source, split)
            rec = np.concatenate([r for r, _, _ in out[split]])
            assert data.images.shape == (len(rec), 32, 32, 3) and data.images.dtype == np.uint8
            assert data.labels.dtype == np.int32
            np.testing.assert_array_equal(data.labels, rec[:, 0])
            # Byte layout by hand: 1 label byte, then R plane, G plane, B plane, row-major.
            for n, (y, x, c) in enumerate([(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (5, 7, 2)]):
                k = n % len(rec)
                assert data.images[k, y, x, c] == rec[k, 1 + c * 1024 + y * 32 + x]
            assert data.class_names == tuple(f'c{i}' for i in range(10))


def test_cifar_binary_default_names_and_limit(tmp_path):
    _, out = _write_bin(tmp_path, meta=False)
    full = im.load(str(tmp_path), 'train')
    assert full.class_names == im.CIFAR10_CLASSES
    lim = im.load(str(tmp_path), 'train', limit_per_class=1)
    labels = full.labels
    expect = [i for i in range(len(labels)) if i == np.flatnonzero(labels == labels[i])[0]]
    np.testing.assert_array_equal(lim.labels, labels[expect])
    np.testing.assert_array_equal(lim.images, full.images[expect])


def test_cifar_python(tmp_path):
    d = tmp_path / 'cifar-10-batches-py'
    d.mkdir()
    expected = []
    for i, name in enumerate([f'data_batch_{j}' for j in range(1, 6)] + ['test_batch']):
        _, labels, chw = _records(2 + i, i)
        # The official files hold bytes keys (pickled by Python 2); accept str keys too.
        batch = {b'data': chw.reshape(len(chw), -1), b'labels': [int(v) for v in labels]}
        if i % 2:
            batch = {k.decode(): v for k, v in batch.items()}
        with open(d / name, 'wb') as fh:
            pickle.dump(batch, fh)
        expected.append((labels, chw.transpose(0, 2, 3, 1)))
    names = [f'n{i}'.encode() for i in range(10)]
    with open(d / 'batches.meta', 'wb') as fh:
        pickle.dump({b'label_names': names}, fh)
    train = im.load(str(tmp_path), 'train')
    np.testing.assert_array_equal(train.labels, np.concatenate([e[0] for e in expected[:5]]))
    np.testing.assert_array_equal(train.images, np.concatenate([e[1] for e in expected[:5]]))
    assert train.class_names == tuple(f'n{i}' for i in range(10))
    test = im.load(str(d), 'test')
    np.testing.assert_array_equal(test.images, expected[5][1])
    assert test.labels.dtype == np.int32 and test.images.dtype == np.uint8


def _save(img, path_or_buf, fmt):
    Image.fromarray(img).save(path_or_buf, format=fmt, **({'quality': 95} if fmt == 'JPEG' else {}))


def test_png_folder_exact_and_class_order(tmp_path):
    pixels = {}
    # Class folders created out of order; one class only exists in test (labels must agree).
    for split, cls, files in [('train', 'zebra', ['b.png', 'a.png']), ('train', 'ant', ['x.png']),
                              ('test', 'moth', ['t.png']), ('test', 'ant', ['u.PNG'])]:
        cdir = tmp_path / 'top' / split / cls
        cdir.mkdir(parents=True, exist_ok=True)
        for f in files:
            img = RNG.integers(0, 256, (32, 32, 3)).astype(np.uint8)
            _save(img, cdir / f, 'PNG')
            pixels[(split, cls, f)] = img
    (tmp_path / 'top' / 'train' / 'zebra' / 'notes.txt').write_text('ignored')
    for source in (tmp_path, tmp_path / 'top'):  # optional single top-level folder
        train = im.load(str(source), 'train')
        assert train.class_names == ('ant', 'moth', 'zebra')
        np.testing.assert_array_equal(train.labels, [0, 2, 2])
        for k, key in enumerate([('ant', 'x.png'), ('zebra', 'a.png'), ('zebra', 'b.png')]):
            np.testing.assert_array_equal(train.images[k], pixels[('train', ) + key])
    test = im.load(str(tmp_path), 'test')
    np.testing.assert_array_equal(test.labels, [0, 1])
    np.testing.assert_array_equal(test.images[0], pixels[('test', 'ant', 'u.PNG')])


def test_png_modes_converted_to_rgb(tmp_path):
    cdir = tmp_path / 'train' / 'c'
    cdir.mkdir(parents=True)
    gray = RNG.integers(0, 256, (32, 32)).astype(np.uint8)
    Image.fromarray(gray, 'L').save(cdir / 'g.png')
    rgba = RNG.integers(0, 256, (32, 32, 4)).astype(np.uint8)
    Image.fromarray(rgba, 'RGBA').save(cdir / 'h.png')
    data = im.load(str(tmp_path), 'train')
    np.testing.assert_array_equal(data.images[0], np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(data.images[1], rgba[..., :3])


def _jpeg_tar(path, classes, per_class, top='cifar'):
    """A tar.gz in the CIFAR-JPEG layout; file j of class c is a smooth image of level 20*j+c."""
    expected = {}
    entries = []
    for split in ('train', 'test'):
        for c, cls in enumerate(classes):
            for j in range(per_class):
                yy, xx = np.mgrid[0:32, 0:32]
                img = np.stack([20 * j + c + yy, 20 * j + c + xx,
                                np.full_like(yy, 100 + 10 * c)], -1).astype(np.uint8)
                buf = io.BytesIO()
                _save(img, buf, 'JPEG')
                name = f'{top}/{split}/{cls}/{j:04d}.jpg' if top else f'{split}/{cls}/{j:04d}.jpg'
                entries.append((name, buf.getvalue()))
                expected[(split, cls, j)] = img
    order = np.random.default_rng(1).permutation(len(entries))  # tar order is not sorted
    with tarfile.open(path, 'w:gz') as tf:
        for i in order:
            name, blob = entries[i]
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return expected


@pytest.mark.parametrize('top,suffix', [('cifar', '.tar.gz'), ('', '.tgz')])
def test_jpeg_tar(tmp_path, top, suffix):
    classes = ['dog', 'cat', 'airplane']
    path = tmp_path / f'data{suffix}'
    expected = _jpeg_tar(path, classes, per_class=3, top=top)
    for split in ('train', 'test'):
        data = im.load(str(path), split)
        assert data.class_names == ('airplane', 'cat', 'dog')
        assert data.images.shape == (9, 32, 32, 3) and data.images.dtype == np.uint8
        np.testing.assert_array_equal(data.labels, np.repeat([0, 1, 2], 3))
        for k in range(9):
            ref = expected[(split, data.class_names[k // 3], k % 3)]
            err = np.abs(data.images[k].astype(int) - ref.astype(int))
            assert err.mean() < 2.0 and err.max() <= 12
    lim = im.load(str(path), 'train', limit_per_class=2)
    np.testing.assert_array_equal(lim.labels, [0, 0, 1, 1, 2, 2])
    # The first two files (0000, 0001) of each class, told apart by brightness 20 * j + c,
    # c = creation index (airplane 2, cat 1, dog 0).
    np.testing.assert_allclose(lim.images[:, 0, 0, 0], [2, 22, 1, 21, 0, 20], atol=4)


def _idx(arr, path, gz):
    header = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, '>u4').tobytes()
    with (gzip.open if gz else open)(path, 'wb') as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize('gz', [False, True])
def test_fashion_mnist_idx(tmp_path, gz):
    ext = '.gz' if gz else ''
    sets = {}
    for prefix, n in (('train', 5), ('t10k', 3)):
        gray = RNG.integers(1, 256, (n, 28, 28)).astype(np.uint8)
        labels = RNG.integers(0, 10, n).astype(np.uint8)
        _idx(gray, tmp_path / f'{prefix}-images-idx3-ubyte{ext}', gz)
        _idx(labels, tmp_path / f'{prefix}-labels-idx1-ubyte{ext}', gz)
        sets['train' if prefix == 'train' else 'test'] = (gray, labels)
    for source in (str(tmp_path), f'fashion_mnist:{tmp_path}'):
        for split, (gray, labels) in sets.items():
            data = im.load(source, split)
            assert data.images.shape == (len(gray), 32, 32, 3) and data.images.dtype == np.uint8
            np.testing.assert_array_equal(data.labels, labels)
            for c in range(3):
                np.testing.assert_array_equal(data.images[:, 2:30, 2:30, c], gray)
            border = np.ones((32, 32), bool)
            border[2:30, 2:30] = False
            assert not data.images[:, border].any()
            assert data.class_names[0] == 'T-shirt/top' and len(data.class_names) == 10


def _raises(match_extra, fn, *args, **kw):
    with pytest.raises(ValueError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert msg.startswith('source=') and '\n' not in msg and 'accepted formats' in msg
    assert match_extra in msg, msg
    return msg


def test_missing_and_malformed_inputs(tmp_path):
    _raises('nope', im.load, str(tmp_path / 'nope'), 'train')
    empty = tmp_path / 'empty'
    empty.mkdir()
    msg = _raises('no recognised dataset', im.load, str(empty), 'train')
    assert 'cifar-10-batches-bin' in msg and 'idx3' in msg and '.tar.gz' in msg
    # Truncated binary batch.
    d, _ = _write_bin(tmp_path / 'bin')
    with open(d / 'data_batch_2.bin', 'ab') as fh:
        fh.write(b'\x01\x02')
    _raises('data_batch_2.bin', im.load, str(tmp_path / 'bin'), 'train')
    os.remove(d / 'test_batch.bin')
    _raises('test_batch.bin', im.load, str(d), 'test')
    # Bad IDX magic, and a missing labels file.
    idx = tmp_path / 'idx'
    idx.mkdir()
    (idx / 'train-images-idx3-ubyte').write_bytes(b'\x00\x00\x0d\x03' + bytes(12))
    _idx(np.zeros(1), idx / 'train-labels-idx1-ubyte', False)
    _raises('train-images-idx3-ubyte', im.load, f'fashion_mnist:{idx}', 'train')
    _raises('t10k-labels', im.load, str(idx), 'test')
    # Garbage archive.
    bad = tmp_path / 'bad.tar.gz'
    bad.write_bytes(b'this is not gzip')
    _raises('bad.tar.gz', im.load, str(bad), 'train')
    # A python batch that is not a dict.
    py = tmp_path / 'pyb' / 'cifar-10-batches-py'
    py.mkdir(parents=True)
    for name in [f'data_batch_{j}' for j in range(1, 6)]:
        with open(py / name, 'wb') as fh:
            pickle.dump([1, 2], fh)
    _raises('data_batch_1', im.load, str(py.parent), 'train')
    with pytest.raises(ValueError, match='^split must be'):
        im.load(str(tmp_path), 'valid')
    with pytest.raises(ValueError, match='^limit_per_class must be'):
        im.load(str(tmp_path), 'train', limit_per_class=0)
    with pytest.raises(ValueError, match=r"^source='/no/such/dir': .*accepted formats"):
        im.load('/no/such/dir', 'train')
    with pytest.raises(ValueError, match=r"^data\.source='/no/such/dir': "):
        im.load('/no/such/dir', 'train', field='data.source')


def test_image_folder_size_and_decode_errors(tmp_path):
    cdir = tmp_path / 'train' / 'c'
    cdir.mkdir(parents=True)
    big = RNG.integers(0, 256, (40, 36, 3)).astype(np.uint8)
    _save(big, cdir / 'big.png', 'PNG')
    _raises('big.png', im.load, str(tmp_path), 'train')
    data = im.load(str(tmp_path), 'train', resize=True)
    assert data.images.shape == (1, 32, 32, 3)
    # Bicubic resize keeps the mean colour close to the original's.
    assert np.abs(data.images.mean((0, 1, 2)) - big.mean((0, 1))).max() < 8
    (cdir / 'broken.jpg').write_bytes(b'\xff\xd8not really a jpeg')
    _raises('broken.jpg', im.load, str(tmp_path), 'train', resize=True)
    _raises("no test/<class>", im.load, str(tmp_path), 'test')


def test_tfds_absent_is_clear(monkeypatch):
    # None in sys.modules makes `import` fail, whether or not tfds is installed here.
    monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
    monkeypatch.setitem(sys.modules, 'tensorflow', None)
    msg = _raises('tfds:cifar10', im.load, 'tfds:cifar10', 'train')
    assert 'not installed' in msg


def test_float_uint8_conversions():
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = im.to_float(u)
    assert x.dtype == np.float32 and x.shape == u.shape
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(x.ravel()[[0, 51, 255]], [-1.0, 51 / 127.5 - 1, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(im.to_uint8(x), u)  # exact round trip
    np.testing.assert_array_equal(im.to_uint8(np.array([-3.0, -1.0, 0.0, 0.999, 7.0])),
                                  [0, 0, 128, 255, 255])
    with pytest.raises(ValueError, match='uint8'):
        im.to_float(np.zeros(3, np.float32))


def test_label_histogram():
    labels = np.array([0, 1, 1, 2, 2, 2, 0])
    hist = partition.label_histogram(
        labels,
        [np.array([0, 1, 2]), np.array([3, 4, 5, 6]),
         np.array([], int)], 4)
    np.testing.assert_array_equal(hist, [[1, 2, 0, 0], [1, 0, 3, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError):
        partition.label_histogram(labels, [np.array([0])], 2)
    with pytest.raises(ValueError):
        partition.label_histogram(labels, [np.array([7])], 3)


def test_random_flip_mirrors_about_half_exactly():
    images = RNG.integers(0, 256, (400, 6, 5, 3)).astype(np.uint8)
    out, flipped = im.random_flip(images, jax.random.PRNGKey(7))
    out, flipped = np.asarray(out), np.asarray(flipped)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert 160 < flipped.sum() < 240  # Binomial(400, 1/2): mean 200, sd 10
    np.testing.assert_array_equal(out[flipped], images[flipped][:, :, ::-1, :])
    np.testing.assert_array_equal(out[~flipped], images[~flipped])
    again, _ = im.random_flip(images, jax.random.PRNGKey(7))
    np.testing.assert_array_equal(np.asarray(again), out)  # a function of the key
    assert not np.array_equal(np.asarray(im.random_flip(images, jax.random.PRNGKey(8))[1]), flipped)
