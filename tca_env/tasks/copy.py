"""The copy task of the TCA paper (the paper's "Copy task").

The context is SOS followed by L/2 - 1 random characters from a vocabulary of 10, one-hot over
12 classes (10 characters, SOS, EOS), at positions 0..L/2-1. The L/2 queries are zero vectors with
position encodings of their own, 0..L/2-1 (the reference implementation embeds the queries as a
sequence of their own); query j must output context character L/2-1-j (the sequence reversed), and
the last query, which mirrors SOS, must output EOS. The tree holds the L/2 context tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Batch, Task

VOCAB = 10
SOS = 10
EOS = 11
NUM_CLASSES = 12


class CopyTask(Task):
    name = "copy"
    head = "class"
    x_dim = NUM_CLASSES
    y_dim = 0
    out_dim = NUM_CLASSES
    ordering = "natural"
    reward = "acc"
    sequential = True

    def __init__(self, seq_len: int = 256):
        if seq_len < 4 or seq_len % 2:
            raise ValueError(f"copy task: seq_len must be an even number >= 4; got {seq_len}")
        self.seq_len = seq_len
        self.n = seq_len // 2

    @property
    def max_context(self) -> int:
        return self.n

    @property
    def max_position(self) -> int:
        return self.n

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu",
               split: str = "train") -> Batch:
        if batch_size <= 0:
            raise ValueError(f"copy task: batch_size must be positive; got {batch_size}")
        n = self.n
        chars = torch.randint(0, VOCAB, (batch_size, n - 1), generator=generator)  # [B, n-1]
        tokens = torch.cat([torch.full((batch_size, 1), SOS), chars], dim=1)  # [B, n]
        # Query j mirrors context position n-1-j; the mirror of SOS is EOS.
        targets = torch.cat([chars.flip(1), torch.full((batch_size, 1), EOS)], dim=1)  # [B, n]
        xc = F.one_hot(tokens, NUM_CLASSES).float()
        xt = torch.zeros(batch_size, n, NUM_CLASSES)
        pos = torch.arange(n)
        return Batch(xc=xc, yc=None, xt=xt, yt=targets, pc=pos, pt=pos.clone()).to(device)
