"""Figures written by the experiments: sample grids, label histograms and grid comparisons (PNG)."""
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def image_grid(images: np.ndarray, path: str, cols: int = 8, scale: int = 2) -> None:
    """uint8 [N, H, W, 3] -> one PNG grid (rows of ``cols``), each image upscaled ``scale``x."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = img
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                 Image.NEAREST).save(path)


def label_histograms(hist: np.ndarray, class_names, path: str, max_clients: int = 100) -> None:
    """Stacked bars of each client's label counts, hist [num_clients, num_classes]."""
    hist = hist[:max_clients]
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.15 * len(hist)), 4))
    bottom = np.zeros(len(hist))
    colors = plt.get_cmap('tab10')
    for k, name in enumerate(class_names):
        ax.bar(np.arange(len(hist)),
               hist[:, k],
               bottom=bottom,
               color=colors(k % 10),
               label=name,
               width=0.9)
        bottom += hist[:, k]
    ax.set_xlabel('client')
    ax.set_ylabel('local train examples')
    ax.set_title('per-client label histogram')
    ax.legend(fontsize=7, ncol=5, loc='upper right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grouped_bars(labels,
                 series: dict,
                 path: str,
                 ylabel: str,
                 title: str,
                 reference: tuple[str, float] | None = None) -> None:
    """One bar per (label, group): ``series[group]`` holds a value per label (None = no bar);
    ``reference`` (name, value) draws a dashed horizontal line."""
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(labels) * max(1, len(series)) / 2 + 2), 4))
    width = 0.8 / max(1, len(series))
    for g, (group, values) in enumerate(series.items()):
        x = np.arange(len(labels)) + (g - (len(series) - 1) / 2) * width
        v = np.array([np.nan if y is None else y for y in values], np.float64)
        ax.bar(x, v, width=width, label=str(group))
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha='right', fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    finite = [y for values in series.values() for y in values if y is not None and np.isfinite(y)]
    if reference is not None:
        ax.axhline(reference[1], color='k', linestyle='--', linewidth=1, label=reference[0])
        finite.append(reference[1])
    if finite:  # zoom to the spread: differences between rows are the result
        lo, hi = min(finite), max(finite)
        pad = 0.15 * (hi - lo) + 1e-3 * abs(hi)
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves(series: dict, path: str, xlabel: str, ylabel: str, title: str) -> None:
    """One line per name: ``series[name]`` is a list of (x, y) points."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, points) in enumerate(series.items()):
        if points:  # the colour cycle has 10 entries: later lines are dashed
            x, y = zip(*points)
            ax.plot(x, y, label=name, marker='.', linestyle='-' if i < 10 else '--')
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def panels(specs: list[dict], path: str, title: str = '') -> None:
    """One row of line panels with optional ±std bands. Each spec is a dict with 'series'
    {name: (x [n], mean [n], std [n] or None, point labels [n] or None)}, 'xlabel', 'ylabel'
    and optionally 'title', 'logx', 'logy' and 'reference' (name, y) for a dotted line."""
    fig, axes = plt.subplots(1, len(specs), figsize=(6.2 * len(specs), 4.2), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        for i, (name, (x, y, std, labels)) in enumerate(spec['series'].items()):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            if not len(x):
                continue
            line, = ax.plot(x, y, marker='o', ms=3, label=name, linestyle='-' if i < 10 else '--')
            if std is not None:  # mean ± std over seeds
                s = np.asarray(std, np.float64)
                ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.2, lw=0)
            for xi, yi, lab in zip(x, y, labels or ()):
                ax.annotate(str(lab), (xi, yi),
                            textcoords='offset points',
                            xytext=(4, 4),
                            fontsize=7)
        if spec.get('reference') is not None:
            name, y = spec['reference']
            ax.axhline(y, color='gray', ls=':', label=name)
        ax.set_xscale('log' if spec.get('logx') else 'linear')
        ax.set_yscale('log' if spec.get('logy') else 'linear')
        ax.set_xlabel(spec['xlabel'])
        ax.set_ylabel(spec['ylabel'])
        ax.set_title(spec.get('title', ''), fontsize=9)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gain_histogram(gains, path: str, xlabel: str, title: str) -> None:
    """Histogram of per-client gains [K] (> 0: the client improved), a line at 0 and the median."""
    gains = np.asarray(gains, np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(gains, bins=min(30, max(5, len(gains) // 3)), color='tab:blue', alpha=0.8)
    ax.axvline(0.0, color='k', lw=1)
    if len(gains):
        ax.axvline(float(np.median(gains)), color='tab:red', ls='--', lw=1.2, label='median')
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel('clients')
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
