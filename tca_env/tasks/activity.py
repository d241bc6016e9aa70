"""Human activity recognition (the paper's "Human activity" experiment): classify every time point of a sequence.

The paper's dataset (body-worn position tags, 7 activities, 50 time steps) is not on a package
registry. The stand-in is the smartwatch IMU data shipped with the PyPI package ``seglearn``
(``seglearn/data/watch_dataset.npy``, a pickled dict that needs only numpy): 140 recordings at
50 Hz of 6 channels (accelerometer ax, ay, az; gyroscope wx, wy, wz), 10 subjects x 7 shoulder
exercises (PEN, ABD, FEL, IR, ER, TRAP, ROW) x 2 arms, each recording one exercise repeated 20 times.

A sequence of ``seq_len`` = 50 steps joins K ~ U{2..4} segments (each at least ``min_segment`` steps)
cut from recordings of *one* subject, each of a different exercise, so the label changes inside
the sequence and the model must locate the changes. Recordings are first average-pooled by
``downsample`` = 4 (12.5 Hz, so 50 steps cover 4 s, about two repetitions) and normalized per
channel with the training subjects' mean and std.

Tokens: the tree holds the 50 context tokens ``xc`` (normalized sensor values, positions
``pc = 0..49``, natural order). The 50 queries carry only their time index (``xt`` zeros,
``pt = 0..49``), like the copy task's queries; query t must output the exercise at time t.
Split by subject: subjects 1-8 train (112 recordings), subjects 9-10 test (28 recordings).

Sources: ``"watch"`` (needs ``pip install seglearn``; its absence raises ``ModuleNotFoundError``
naming the package), ``"synthetic"`` (class-dependent noisy sinusoids, no package), or recordings
passed in directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .base import Batch, Task
from .images import find_package_file

SOURCES = ("watch", "synthetic")
SPLITS = ("train", "test")
WATCH_CLASSES = ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")


def load_watch() -> tuple[list[np.ndarray], np.ndarray, np.ndarray, list[str]]:
    """seglearn's watch data: recordings ``[T_i, 6]``, labels ``[140]``, subjects ``[140]``, class names."""
    path = find_package_file("seglearn", "data/watch_dataset.npy", "activity")
    data = np.load(path, allow_pickle=True).item()
    return list(data["X"]), np.asarray(data["y"]), np.asarray(data["subject"]), list(data["y_labels"])


def synthetic_recordings(num_subjects: int = 10, num_classes: int = 7, per_class: int = 2, length: int = 400,
                         channels: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy sinusoids whose frequency, amplitudes and offsets depend on the class (50 Hz, like the watch).

    Returns recordings ``[R, length, channels]``, labels ``[R]`` and subjects ``[R]`` (ids 1..S), with
    ``R = num_subjects * num_classes * per_class``.
    """
    if min(num_subjects, num_classes, per_class, length, channels) <= 0:
        raise ValueError("synthetic activity data: every size must be positive")
    g = torch.Generator().manual_seed(seed)
    subjects = torch.arange(1, num_subjects + 1).repeat_interleave(num_classes * per_class)  # [R]
    labels = torch.arange(num_classes).repeat_interleave(per_class).repeat(num_subjects)  # [R]
    R = labels.numel()
    freq = 0.4 + 0.3 * torch.arange(num_classes)  # [classes] Hz
    amp = 0.5 + torch.rand(num_classes, channels, generator=g)  # [classes, C]
    offset = torch.randn(num_classes, channels, generator=g)  # [classes, C]
    gain = 0.8 + 0.4 * torch.rand(num_subjects, 1, generator=g)  # [S, 1]: subjects differ a little
    phase = 2 * torch.pi * torch.rand(R, 1, channels, generator=g)  # [R, 1, C]
    t = torch.arange(length).float()[None, :, None] / 50.0  # [1, L, 1] seconds
    wave = torch.sin(2 * torch.pi * freq[labels][:, None, None] * t + phase)  # [R, L, C]
    x = gain[subjects - 1][:, None] * amp[labels][:, None] * wave + offset[labels][:, None]
    return x + 0.1 * torch.randn(R, length, channels, generator=g), labels, subjects


class ActivityTask(Task):
    """Per-time-point activity classification of sequences stitched from one subject's recordings.

    Args:
        source: ``"watch"`` (seglearn) or ``"synthetic"``; ignored when ``recordings`` is given.
        recordings: ``R`` arrays ``[T_i, C]`` (or one ``[R, T, C]`` tensor) to use instead of a source.
        labels: ``[R]`` class of each recording (required with ``recordings``).
        subjects: ``[R]`` subject id of each recording (required with ``recordings``).
        test_subjects: subject ids held out for ``"test"`` (default: the last 20% of the sorted ids,
            at least one: subjects 9 and 10 of the watch data).
        num_classes: number of classes (default: largest label + 1).
        seq_len: time steps per sequence (paper: 50).
        downsample: average-pool recordings by this factor first (default 4: 50 Hz -> 12.5 Hz).
        num_segments: (lo, hi): each sequence joins K ~ U{lo..hi} segments of distinct classes.
        min_segment: shortest segment, in steps.
    """

    name = "activity"
    head = "class"
    x_dim = 6
    y_dim = 0
    out_dim = len(WATCH_CLASSES)
    ordering = "natural"
    reward = "acc"
    sequential = True

    def __init__(self, source: str = "watch", recordings: Sequence[np.ndarray | torch.Tensor] | None = None,
                 labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
                 subjects: Sequence[int] | np.ndarray | torch.Tensor | None = None,
                 test_subjects: Sequence[int] | None = None, num_classes: int | None = None,
                 seq_len: int = 50, downsample: int = 4, num_segments: tuple[int, int] = (2, 4),
                 min_segment: int = 5):
        lo, hi = num_segments
        if seq_len < 2:
            raise ValueError(f"activity task: seq_len must be >= 2; got {seq_len}")
        if downsample < 1 or min_segment < 1 or not 1 <= lo <= hi:
            raise ValueError(f"activity task: need downsample >= 1, min_segment >= 1 and 1 <= lo <= hi for "
                             f"num_segments; got {downsample}, {min_segment}, {num_segments}")
        if hi * min_segment > seq_len:
            raise ValueError(f"activity task: {hi} segments of >= {min_segment} steps do not fit in "
                             f"seq_len = {seq_len}")
        class_names: list[str] | None = None
        if recordings is not None:
            source = "recordings"
            if labels is None or subjects is None:
                raise ValueError("activity task: recordings need labels and subjects")
        elif source == "watch":
            recordings, labels, subjects, class_names = load_watch()
        elif source == "synthetic":
            recordings, labels, subjects = synthetic_recordings()
        else:
            raise ValueError(f"activity task: unknown source {source!r}; known sources: {SOURCES}, "
                             f"or pass recordings=")
        recs = [torch.as_tensor(np.asarray(r), dtype=torch.float32) for r in recordings]
        labels_t = torch.as_tensor(np.asarray(labels)).long()
        subjects_t = torch.as_tensor(np.asarray(subjects)).long()
        self._check_recordings(recs, labels_t, subjects_t, seq_len * downsample)
        num_classes = int(labels_t.max()) + 1 if num_classes is None else num_classes
        if int(labels_t.min()) < 0 or int(labels_t.max()) >= num_classes:
            raise ValueError(f"activity task: labels must be in [0, {num_classes}); got "
                             f"[{int(labels_t.min())}, {int(labels_t.max())}]")

        ids = subjects_t.unique()  # sorted
        if test_subjects is None:
            test_subjects = ids[len(ids) - max(1, round(0.2 * len(ids))):].tolist()
        test_ids = torch.as_tensor(list(test_subjects)).long()
        train_ids = ids[~torch.isin(ids, test_ids)]
        if train_ids.numel() == 0 or not torch.isin(test_ids, ids).all():
            raise ValueError(f"activity task: test_subjects {list(test_subjects)} must be a proper subset of "
                             f"the subjects {ids.tolist()}")

        # Average-pool, then concatenate every recording into one [T_total, C] signal.
        pooled = [r[: r.shape[0] // downsample * downsample].reshape(-1, downsample, r.shape[1]).mean(1)
                  for r in recs]
        lengths = torch.tensor([p.shape[0] for p in pooled])  # [R]
        signal = torch.cat(pooled)  # [T_total, C]
        is_train = torch.isin(subjects_t, train_ids).repeat_interleave(lengths)  # [T_total]
        self.mean = signal[is_train].mean(0)  # [C]
        self.std = signal[is_train].std(0).clamp_min(1e-6)  # [C]
        self.signal = (signal - self.mean) / self.std
        self.offsets = torch.cumsum(lengths, 0) - lengths  # [R]
        self.lengths, self.labels, self.subjects = lengths, labels_t, subjects_t

        self.source = source
        self.x_dim = recs[0].shape[1]
        self.out_dim = num_classes
        self.class_names = class_names or [str(c) for c in range(num_classes)]
        self.seq_len, self.downsample = seq_len, downsample
        self.num_segments, self.min_segment = (lo, hi), min_segment
        self.split_subjects = {"train": train_ids, "test": test_ids.unique()}
        self._tables = {s: self._recording_table(ids_, hi) for s, ids_ in self.split_subjects.items()}

    @staticmethod
    def _check_recordings(recs: list[torch.Tensor], labels: torch.Tensor, subjects: torch.Tensor,
                          min_len: int) -> None:
        if not recs:
            raise ValueError("activity task: no recordings")
        if labels.shape != (len(recs),) or subjects.shape != (len(recs),):
            raise ValueError(f"activity task: labels and subjects must be [R] = [{len(recs)}]; got "
                             f"{tuple(labels.shape)} and {tuple(subjects.shape)}")
        channels = recs[0].shape[-1] if recs[0].dim() == 2 else -1
        for i, r in enumerate(recs):
            if r.dim() != 2 or r.shape[1] != channels or channels < 1:
                raise ValueError(f"activity task: recording {i} must be [T, {channels}]; got "
                                 f"{tuple(r.shape)}")
            if r.shape[0] < min_len:
                raise ValueError(f"activity task: recording {i} has {r.shape[0]} samples; need >= seq_len * "
                                 f"downsample = {min_len}")
            if not torch.isfinite(r).all():
                raise ValueError(f"activity task: recording {i} contains NaN or inf")

    def _recording_table(self, subject_ids: torch.Tensor, min_classes: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``table [S, classes, R_max]`` of recording indices (-1 padded) and ``counts [S, classes]``."""
        S, classes = subject_ids.numel(), self.out_dim
        counts = torch.zeros(S, classes, dtype=torch.long)
        members: list[list[list[int]]] = [[[] for _ in range(classes)] for _ in range(S)]
        row = {int(s): i for i, s in enumerate(subject_ids)}
        for r, (s, c) in enumerate(zip(self.subjects.tolist(), self.labels.tolist(), strict=True)):
            if s in row:
                members[row[s]][c].append(r)
                counts[row[s], c] += 1
        short = [int(subject_ids[i]) for i in range(S) if int((counts[i] > 0).sum()) < min_classes]
        if short:
            raise ValueError(f"activity task: subjects {short} have fewer than {min_classes} classes, "
                             f"too few for num_segments up to {min_classes}")
        table = torch.full((S, classes, int(counts.max())), -1, dtype=torch.long)
        for i in range(S):
            for c in range(classes):
                table[i, c, : counts[i, c]] = torch.tensor(members[i][c], dtype=torch.long)
        return table, counts

    @property
    def max_context(self) -> int:
        return self.seq_len

    @property
    def max_position(self) -> int:
        return self.seq_len

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu",
               split: str = "train") -> Batch:
        if batch_size <= 0:
            raise ValueError(f"activity task: batch_size must be positive; got {batch_size}")
        if split not in self._tables:
            raise ValueError(f"activity task: unknown split {split!r}; known splits: {SPLITS}")
        B, T, (lo, hi), m = batch_size, self.seq_len, self.num_segments, self.min_segment
        table, counts = self._tables[split]
        subj = torch.randint(0, table.shape[0], (B,), generator=generator)  # [B]
        K = torch.randint(lo, hi + 1, (B,), generator=generator)  # [B] segments per sequence

        # Distinct classes per sequence: a random permutation of the classes this subject has.
        class_keys = torch.rand(B, self.out_dim, generator=generator).masked_fill(counts[subj] == 0, 2.0)
        seg_class = class_keys.argsort(-1)[:, :hi]  # [B, hi]
        n_rec = counts[subj].gather(1, seg_class)  # [B, hi], all >= 1
        pick = (torch.rand(B, hi, generator=generator) * n_rec).long().clamp_max(n_rec - 1)
        rec = table[subj[:, None], seg_class, pick]  # [B, hi]
        # Each segment reads its recording from a random start at absolute step t, so it always fits.
        start = (torch.rand(B, hi, generator=generator) * (self.lengths[rec] - T + 1)).long()  # [B, hi]

        # K-1 cuts, segments >= m steps: choose K-1 distinct points in 1..T-K(m-1)-1, then spread them.
        cand = torch.arange(1, T)  # [T-1]
        upper = T - K * (m - 1) - 1  # [B]
        cut_keys = torch.rand(B, T - 1, generator=generator).masked_fill(cand > upper[:, None], 2.0)
        active = torch.arange(hi - 1) < (K - 1)[:, None]  # [B, hi-1]
        picked = cand[cut_keys.argsort(-1)[:, : hi - 1]].masked_fill(~active, T).sort(-1).values  # [B, hi-1]
        cuts = torch.where(active, picked + torch.arange(1, hi) * (m - 1), T)  # [B, hi-1]

        t = torch.arange(T)  # [T]
        seg = (t[None, :, None] >= cuts[:, None, :]).sum(-1)  # [B, T] segment of each step
        index = self.offsets[rec.gather(1, seg)] + start.gather(1, seg) + t  # [B, T]
        xc = self.signal[index]  # [B, T, C]
        yt = seg_class.gather(1, seg)  # [B, T]
        xt = torch.zeros(B, T, self.x_dim)
        return Batch(xc=xc, yc=None, xt=xt, yt=yt, pc=t, pt=t.clone()).to(device)
