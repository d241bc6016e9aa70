"""Small tensor helpers shared by the tree and the search."""

from __future__ import annotations

import torch


def softmax_small(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over a short dimension.

    Two entries (the paper's binary tree, and P = 2 leaf buckets) use sigmoids of the differences:
    same values, several times faster than a CPU softmax over a dimension of size 2. Finite large
    negative masks behave as in softmax (a masked entry gets 0; two masked entries get 1/2 each).
    """
    if x.shape[dim] != 2:
        return x.softmax(dim)
    a, b = x.unbind(dim)
    d = a - b
    return torch.stack([torch.sigmoid(d), torch.sigmoid(-d)], dim)
