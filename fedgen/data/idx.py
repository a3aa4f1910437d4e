"""IDX files (LeCun's MNIST format, also Fashion-MNIST's), as numpy arrays.

A file is: bytes 0, 0; a type byte (0x08 = uint8, the only type read here); the number of
dimensions d; d big-endian uint32 sizes; then the values in C order. Files may be gzipped
(``.gz``). A split is two files in one directory,

    {prefix}-images-idx3-ubyte[.gz]   uint8 [n, h, w]   (prefix 'train' or 't10k')
    {prefix}-labels-idx1-ubyte[.gz]   uint8 [n]

Errors are ``IdxError`` (a ValueError) with a one-line reason naming the file; callers add the
config field (see fedgen.data.images).
"""
import gzip
import os
import zlib

import numpy as np

# Debian/Ubuntu: `apt-get install -y dataset-fashion-mnist` puts the four .gz files here.
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_APT = 'apt-get install -y dataset-fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                         'Sneaker', 'Bag', 'Ankle boot')
PREFIXES = {'train': 'train', 'test': 't10k'}


class IdxError(ValueError):
    """A missing or malformed IDX file."""


def find(d: str, prefix: str, kind: str, ndim: int) -> str | None:
    """Path of ``{prefix}-{kind}-idx{ndim}-ubyte`` or its ``.gz`` in directory d, else None."""
    for ext in ('', '.gz'):
        f = os.path.join(d, f'{prefix}-{kind}-idx{ndim}-ubyte{ext}')
        if os.path.isfile(f):
            return f
    return None


def read(f: str, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file with ``ndim`` dimensions (see the module docstring)."""
    try:
        with (gzip.open if f.endswith('.gz') else open)(f, 'rb') as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as e:
        raise IdxError(f'cannot read {f!r}: {e}')
    if len(raw) < 4 + 4 * ndim or raw[:3] != b'\x00\x00\x08' or raw[3] != ndim:
        raise IdxError(f'{f!r} is not a {ndim}-d uint8 IDX file (bad header)')
    dims = tuple(int(v) for v in np.frombuffer(raw, '>u4', ndim, 4))
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise IdxError(f'{f!r} holds {body.size} bytes of data, header says {dims}')
    return body.reshape(dims)


def load_split(d: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, h, w], labels uint8 [n]) of split 'train' | 'test' in directory d."""
    prefix = PREFIXES[split]
    fi, fl = find(d, prefix, 'images', 3), find(d, prefix, 'labels', 1)
    if not fi or not fl:
        raise IdxError(f'missing {prefix}-images-idx3-ubyte[.gz] or '
                       f'{prefix}-labels-idx1-ubyte[.gz] in {d!r}')
    images, labels = read(fi, 3), read(fl, 1)
    if labels.shape != images.shape[:1]:
        raise IdxError(f'{fl!r} has {labels.shape[0]} labels for {images.shape[0]} images')
    return images, labels


def write(arr: np.ndarray, f: str) -> None:
    """Writes uint8 ``arr`` as an IDX file (gzipped when f ends in .gz); the inverse of read."""
    header = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, '>u4').tobytes()
    with (gzip.open if f.endswith('.gz') else open)(f, 'wb') as fh:
        fh.write(header + np.ascontiguousarray(arr, np.uint8).tobytes())
