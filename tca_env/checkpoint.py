"""Reading checkpoints: what the environment needs to load a trained predictor.

Writing (atomic saves, RNG states) belongs to the trainer (``training/checkpoint.py``); reading lives
here so that ``gym.make("TreeRetrieval-v0", predictor="run/checkpoint.pt")`` needs no trainer.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from .model import ModelConfig, ReTreever

FORMAT = "tree-retrieval-checkpoint-v2"
#: formats of earlier versions whose model layers differ from this one's (they cannot be loaded)
OLD_FORMATS = {"tree-retrieval-checkpoint-v1": "the layers before they followed the reference implementation"}


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and sanity-check a checkpoint; a missing, corrupt or foreign file raises a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # weights_only: tensors and plain Python values only. A pickle may name any callable, which
        # unpickling would run: a checkpoint someone hands you must not be able to execute code.
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refused to load {path}: it holds Python objects other than tensors and plain data, "
                         f"and unpickling them could run code (this package's checkpoints never do): {e}") from e
    except Exception as e:  # torch raises several types for truncated / garbage files
        raise ValueError(f"checkpoint {path} is corrupt or unreadable: {e}") from e
    if isinstance(ckpt, dict) and ckpt.get("format") in OLD_FORMATS:
        raise ValueError(f"checkpoint {path} was written by an earlier version of this package "
                         f"({ckpt['format']}: {OLD_FORMATS[ckpt['format']]}); its weights do not fit this model: "
                         "train again")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tree-retrieval checkpoint (expected format {FORMAT!r})")
    for key in ("model", "model_config", "train_config", "step"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} lacks {key!r}")
    return ckpt


def load_predictor(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ReTreever, dict[str, Any]]:
    """A trained ReTreever (in eval mode) and its checkpoint dict."""
    ckpt = load(path, device)
    try:
        model = ReTreever(ModelConfig(**ckpt["model_config"])).to(device)
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"checkpoint {path} does not match its own model config: {e}") from e
    return model.eval(), ckpt


#: TrainConfig fields that are task constructor options
TASK_OPTION_FIELDS = ("seq_len", "query_positions", "context_len", "min_context_len", "min_key_scale", "kernel",
                      "source")


def task_of(ckpt: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The task name and constructor options a checkpoint was trained on (from its train config)."""
    tc = ckpt["train_config"]
    options: dict[str, Any] = json.loads(tc["task_args"]) if tc.get("task_args") else {}
    options.update({k: tc[k] for k in TASK_OPTION_FIELDS if tc.get(k) is not None})
    return tc["task"], options
