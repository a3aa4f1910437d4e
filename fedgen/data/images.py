"""Image-classification data for the diffusion task: CIFAR-10 and friends, as numpy arrays.

Every loader returns an `ImageData` with
    images:      uint8 [N, 32, 32, 3]  (HWC, RGB)
    labels:      int32 [N], values in [0, len(class_names))
    class_names: tuple[str, ...]

`load(source, split)` dispatches on `data.source`:
  * 'tfds:cifar10' (any 'tfds:<name>' of 32x32 images): tensorflow_datasets, already prepared
    locally. Never downloads (download=False); needs tensorflow + tensorflow_datasets.
  * a directory that holds (or is) `cifar-10-batches-bin/`: the official binary version,
    data_batch_1..5.bin / test_batch.bin, records of 1 label byte + 3072 pixel bytes (CHW).
  * a directory that holds (or is) `cifar-10-batches-py/`: the official python version.
    These are pickle files: unpickling runs arbitrary code, so use it for trusted files only.
  * an image folder `<root>/<split>/<class>/*.png|*.jpg|*.jpeg`, as a directory or as a
    `.tar.gz`/`.tgz` archive (read in one streaming pass, never extracted to disk), optionally
    under one top-level folder. Class order = sorted class folder names (union of both splits,
    so train and test labels agree). Images are ordered by (class, file name).
  * Fashion-MNIST IDX files (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
    `t10k-...`), as 'fashion_mnist:<dir>' or a directory holding them: 28x28 grayscale is
    zero-padded to 32x32 (2 pixels each side) and repeated to 3 channels.

`limit_per_class=L` keeps the first L images of each class (in file-name order for image
folders, in dataset order otherwise), so quick configs load a deterministic subset.

Diffusion models work in x in [-1, 1]: x = u / 127.5 - 1 (`to_float`), u = round((x+1)*127.5)
clipped to [0, 255] (`to_uint8`).
"""
import dataclasses
import io
import os
import pathlib
import pickle
import tarfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from fedgen.data import idx

SPLITS = ('train', 'test')
SIZE = 32
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                   'truck')
FASHION_MNIST_CLASSES = idx.FASHION_MNIST_CLASSES
FORMATS = ("accepted formats: 'tfds:cifar10'; a directory holding cifar-10-batches-bin/ "
           "(binary) or cifar-10-batches-py/ (pickle); an image folder "
           "<root>/{train,test}/<class>/*.png|*.jpg|*.jpeg as a directory or .tar.gz/.tgz; "
           "Fashion-MNIST IDX files ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]) "
           "as a directory or 'fashion_mnist:<dir>'")
_IMAGE_EXTS = ('.png', '.jpg', '.jpeg')


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    """images uint8 [N, 32, 32, 3]; labels int32 [N]; class_names, one per label value."""
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class SourceError(ValueError):
    """A source that cannot be read: ``source`` and ``why`` (one line); :func:`load` turns it
    into ``<field>=<source>: <why>; <accepted formats>``."""

    def __init__(self, source, why):
        self.source, self.why = source, ' '.join(str(why).split())
        super().__init__(self.message('source'))

    def message(self, field: str) -> str:
        return f'{field}={self.source!r}: {self.why}; {FORMATS}'


def load(source: str,
         split: str,
         *,
         limit_per_class=None,
         resize: bool = False,
         field: str = 'source') -> ImageData:
    """Loads one split of an image-classification dataset (see the module docstring).

    Args:
      source: 'tfds:<name>', 'fashion_mnist:<dir>', a directory or a .tar.gz/.tgz path.
      split: 'train' or 'test'.
      limit_per_class: None (all) or a positive int: keep the first that many of each class.
      resize: image folders only; resize images that are not 32x32 (bicubic) instead of failing.
      field: the name errors give ``source`` (the caller's, e.g. 'data.source').
    Returns:
      ImageData(images uint8 [N, 32, 32, 3], labels int32 [N], class_names).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    lim = limit_per_class
    if lim is not None and not (np.issubdtype(type(lim), np.integer) and lim >= 1):
        raise ValueError(f'limit_per_class must be None or an int >= 1, got {lim!r}')
    try:
        return _load(source, split, limit_per_class, resize)
    except SourceError as e:
        raise ValueError(e.message(field)) from None


def _load(source, split, limit_per_class, resize) -> ImageData:
    """:func:`load` after its argument checks; errors are :class:`SourceError` without a field."""
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        raise SourceError(source, 'expected a non-empty string')
    source = os.fspath(source)
    if source.startswith('tfds:'):
        data = _load_tfds(source, source[len('tfds:'):], split)
    elif source.startswith('fashion_mnist:'):
        path = os.path.expanduser(source[len('fashion_mnist:'):])
        if not os.path.isdir(path):
            raise SourceError(
                source, f'no such directory {path!r} (Debian/Ubuntu: '
                f'{idx.FASHION_MNIST_APT} installs {idx.FASHION_MNIST_DIR})')
        data = _load_idx(source, path, split)
    else:
        path = os.path.expanduser(source)
        if os.path.isfile(path) and path.endswith(('.tar.gz', '.tgz')):
            return _load_folder_tar(source, path, split, limit_per_class, resize)
        if not os.path.isdir(path):
            raise SourceError(source, f'{path!r} is neither a directory nor a .tar.gz/.tgz file')
        bin_dir = _batches_dir(path, 'cifar-10-batches-bin', 'data_batch_1.bin')
        py_dir = _batches_dir(path, 'cifar-10-batches-py', 'data_batch_1')
        if bin_dir:
            data = _load_cifar_bin(source, bin_dir, split)
        elif py_dir:
            data = _load_cifar_py(source, py_dir, split)
        elif idx.find(path, 'train', 'images', 3) or idx.find(path, 't10k', 'images', 3):
            data = _load_idx(source, path, split)
        elif _folder_root(path):
            return _load_folder_dir(source, _folder_root(path), split, limit_per_class, resize)
        else:
            raise SourceError(source, f'no recognised dataset in directory {path!r}')
    return _first_per_class(data, limit_per_class)


# ---------------------------------------------------------------------------------------------
# Array formats: tfds, CIFAR-10 binary / python batches, IDX.


def _checked(source, images, labels, class_names) -> ImageData:
    """Validates shapes, dtypes and label range of a loaded split."""
    images, labels = np.ascontiguousarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.shape[1:] != (SIZE, SIZE, 3):
        raise SourceError(
            source, f'images are {images.dtype}{list(images.shape)}, '
            f'expected uint8[N, {SIZE}, {SIZE}, 3]')
    if labels.shape != (images.shape[0], ):
        raise SourceError(source, f'labels {labels.shape} do not match {images.shape[0]} images')
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise SourceError(source, f'labels outside [0, {len(class_names)})')
    return ImageData(images, labels.astype(np.int32), tuple(str(c) for c in class_names))


def _first_per_class(data: ImageData, limit) -> ImageData:
    """Keeps the first `limit` examples of each class, preserving dataset order."""
    if limit is None:
        return data
    keep = np.zeros(data.labels.shape, bool)
    for c in np.unique(data.labels):
        keep[np.flatnonzero(data.labels == c)[:limit]] = True
    return ImageData(data.images[keep], data.labels[keep], data.class_names)


def _load_tfds(source, name, split) -> ImageData:
    try:
        import tensorflow  # noqa: F401  (tfds needs TF to read prepared data)
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise SourceError(
            source, f'tensorflow and tensorflow_datasets are needed for tfds sources '
            f'and are not installed ({e}); pip install tensorflow tensorflow-datasets')
    try:
        kw = {'as_supervised': True, 'batch_size': -1, 'download': False, 'with_info': True}
        ds, info = tfds.load(name, split=split, **kw)  # never download: prepared data only
        images, labels = tfds.as_numpy(ds)
        class_names = info.features['label'].names
    except Exception as e:  # tfds raises many types (AssertionError, DatasetNotFoundError, ...)
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
        raise SourceError(
            source, f'tfds could not load {name!r} split {split!r} without downloading '
            f'(prepare it locally first): {type(e).__name__}: {msg}')
    return _checked(source, images, labels, class_names)


def _batches_dir(path, name, marker):
    """`path` itself if it holds `marker`, else `path/name` if that is a directory, else None."""
    if os.path.isfile(os.path.join(path, marker)):
        return path
    sub = os.path.join(path, name)
    return sub if os.path.isdir(sub) else None


def _batch_files(source, d, split, ext):
    names = [f'data_batch_{i}' for i in range(1, 6)] if split == 'train' else ['test_batch']
    files = [os.path.join(d, n + ext) for n in names]
    for f in files:
        if not os.path.isfile(f):
            raise SourceError(source, f'missing file {f!r}')
    return files


def _load_cifar_bin(source, d, split) -> ImageData:
    """Official binary CIFAR-10: each record is 1 label byte then 3072 bytes, R, G, B planes."""
    records = []
    for f in _batch_files(source, d, split, '.bin'):
        raw = np.fromfile(f, dtype=np.uint8)
        if raw.size == 0 or raw.size % (1 + 3 * SIZE * SIZE):
            raise SourceError(
                source, f'{f!r} has {raw.size} bytes, not a positive multiple of 3073 '
                '(1 label byte + 3072 CHW pixel bytes)')
        records.append(raw.reshape(-1, 1 + 3 * SIZE * SIZE))
    rec = np.concatenate(records)
    images = rec[:, 1:].reshape(-1, 3, SIZE, SIZE).transpose(0, 2, 3, 1)  # CHW -> HWC
    meta = os.path.join(d, 'batches.meta.txt')
    names = CIFAR10_CLASSES
    if os.path.isfile(meta):
        with open(meta) as fh:
            names = tuple(line.strip() for line in fh if line.strip()) or names
    return _checked(source, images, rec[:, 0], names)


def _unpickle(source, f):
    # Pickle can execute code on load: this path is for trusted, official CIFAR files only.
    try:
        with open(f, 'rb') as fh:
            obj = pickle.load(fh, encoding='bytes')
    except Exception as e:  # unpickling a bad file can raise nearly anything
        raise SourceError(source, f'cannot unpickle {f!r}: {type(e).__name__}: {e}')
    if not isinstance(obj, dict):
        raise SourceError(source, f'{f!r} does not hold a dict')
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _load_cifar_py(source, d, split) -> ImageData:
    """Official python CIFAR-10: pickled dicts with 'data' uint8 [n, 3072] (CHW) and 'labels'."""
    images, labels = [], []
    for f in _batch_files(source, d, split, ''):
        batch = _unpickle(source, f)
        if 'data' not in batch or 'labels' not in batch:
            raise SourceError(source, f"{f!r} lacks 'data' or 'labels'")
        data = np.asarray(batch['data'])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIZE * SIZE:
            raise SourceError(
                source, f"{f!r} 'data' is {data.dtype}{list(data.shape)}, "
                'expected uint8[n, 3072]')
        images.append(data.reshape(-1, 3, SIZE, SIZE).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch['labels']).reshape(-1))
    names = CIFAR10_CLASSES
    meta = os.path.join(d, 'batches.meta')
    if os.path.isfile(meta):
        got = _unpickle(source, meta).get('label_names')
        if got:
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in got)
    return _checked(source, np.concatenate(images), np.concatenate(labels), names)


def _load_idx(source, d, split) -> ImageData:
    """Fashion-MNIST IDX: [n, h, w] grayscale, h, w <= 32, centred in 32x32 zeros, gray -> RGB.

    28x28 images get 2 zero pixels on each side (the U-Net needs sizes divisible by 2**levels,
    and zero is Fashion-MNIST's background); the gray value is repeated over R, G and B.
    """
    try:
        gray, labels = idx.load_split(d, split)
    except idx.IdxError as e:
        raise SourceError(source, e)
    n, h, w = gray.shape
    prefix = idx.PREFIXES[split]
    if h > SIZE or w > SIZE:
        raise SourceError(source,
                          f'{prefix} images in {d!r} are {h}x{w}, larger than {SIZE}x{SIZE}')
    top, left = (SIZE - h) // 2, (SIZE - w) // 2
    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    images[:, top:top + h, left:left + w, :] = gray[..., None]
    return _checked(source, images, labels, idx.FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------
# Image folders: <root>/<split>/<class>/<file>, as a directory or a tar archive.


def _is_image(name) -> bool:
    return name.lower().endswith(_IMAGE_EXTS)


def _folder_root(path):
    """`path` if it has a split folder, else its only sub-folder if that has one, else None."""
    if any(os.path.isdir(os.path.join(path, s)) for s in SPLITS):
        return path
    subs = [e.path for e in os.scandir(path) if e.is_dir()]
    if len(subs) == 1 and any(os.path.isdir(os.path.join(subs[0], s)) for s in SPLITS):
        return subs[0]
    return None


def _load_folder_dir(source, root, split, limit, resize) -> ImageData:
    classes = set()
    for s in SPLITS:
        if os.path.isdir(os.path.join(root, s)):
            classes.update(e.name for e in os.scandir(os.path.join(root, s)) if e.is_dir())
    files = {}
    split_dir = os.path.join(root, split)
    if os.path.isdir(split_dir):
        for cls in os.listdir(split_dir):
            cdir = os.path.join(split_dir, cls)
            if os.path.isdir(cdir):
                files[cls] = sorted(n for n in os.listdir(cdir) if _is_image(n))[:limit]
    members = [(cls, os.path.join(split_dir, cls, n)) for cls in files for n in files[cls]]
    blobs = {(cls, p): pathlib.Path(p).read_bytes() for cls, p in members}
    return _assemble(source, root, split, sorted(classes), blobs, resize)


def _load_folder_tar(source, path, split, limit, resize) -> ImageData:
    """One streaming pass over the archive (gzip cannot seek cheaply); keeps encoded bytes of
    the requested split in memory and decodes only the selected files."""
    tops, classes, blobs = set(), set(), {}
    try:
        with tarfile.open(path, 'r|*') as tf:
            for m in tf:
                parts = [p for p in m.name.split('/') if p not in ('', '.')]
                if not m.isfile() or len(parts) not in (3, 4) or not _is_image(parts[-1]):
                    continue
                s, cls, _ = parts[-3:]
                if s not in SPLITS:
                    continue
                tops.add(parts[0] if len(parts) == 4 else '')
                classes.add(cls)
                if s == split:
                    blobs[(cls, '/'.join(parts))] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise SourceError(source, f'cannot read archive {path!r}: {type(e).__name__}: {e}')
    if len(tops) > 1:
        raise SourceError(
            source, f'{path!r} has split folders under several top-level folders '
            f'{sorted(tops)}')
    if limit is not None:
        by_class = {}
        for key in sorted(blobs):
            by_class.setdefault(key[0], []).append(key)
        blobs = {k: blobs[k] for keys in by_class.values() for k in keys[:limit]}
    return _assemble(source, path, split, sorted(classes), blobs, resize)


def _assemble(source, where, split, classes, blobs, resize) -> ImageData:
    """Decodes {(class, name): encoded bytes} in (class, name) order into an ImageData."""
    if not blobs:
        raise SourceError(source, f'no {split}/<class>/*.png|*.jpg|*.jpeg images in {where!r}')
    index = {c: i for i, c in enumerate(classes)}
    keys = sorted(blobs, key=lambda k: (index[k[0]], k[1]))
    images = np.empty((len(keys), SIZE, SIZE, 3), np.uint8)
    for i, key in enumerate(keys):
        images[i] = _decode(source, key[1], blobs[key], resize)
    labels = np.array([index[k[0]] for k in keys], np.int32)
    return ImageData(images, labels, tuple(classes))


def _decode(source, name, blob, resize) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> uint8 [32, 32, 3] RGB (alpha dropped, palette expanded)."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            rgb = im.convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise SourceError(source, f'cannot decode image {name!r}: {type(e).__name__}: {e}')
    if rgb.size != (SIZE, SIZE):
        if not resize:
            w, h = rgb.size
            raise SourceError(
                source, f'image {name!r} is {w}x{h}, expected {SIZE}x{SIZE} '
                '(pass resize=True to resize)')
        rgb = rgb.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return np.asarray(rgb, np.uint8)


# ---------------------------------------------------------------------------------------------
# Pixel domain.


def to_float(images) -> np.ndarray:
    """uint8 [..., H, W, C] in [0, 255] -> float32 in [-1, 1]: x = u / 127.5 - 1."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f'to_float: images must be uint8 in [0, 255], got {images.dtype}')
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def is_gray(images: np.ndarray) -> bool:
    """True when every pixel of images [N, H, W, 3] has R = G = B (grayscale stored as RGB)."""
    return bool(np.all(images[..., :1] == images[..., 1:]))


def to_uint8(x) -> np.ndarray:
    """float in [-1, 1] (values outside are clipped) -> uint8: u = clip(round((x+1)*127.5))."""
    x = np.asarray(x, np.float32)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def random_flip(images, key) -> tuple:
    """Mirrors each image left-right with probability 1/2: (out, flipped bool [N]).

    images [N, H, W, C] (any dtype, jax or numpy); out[n] = images[n, :, ::-1, :] where
    flipped[n], else images[n]; flipped ~ Bernoulli(1/2) i.i.d. from ``key``.
    """
    flipped = jax.random.bernoulli(key, 0.5, (images.shape[0], ))
    return jnp.where(flipped[:, None, None, None], images[:, :, ::-1, :], images), flipped
