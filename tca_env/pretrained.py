"""Trained predictors shipped with the package: the fixed problems behind the benchmark env ids.

Each predictor is two files in ``tca_env/pretrained/``: ``<name>.safetensors`` (the weights; safetensors
holds tensors only, so loading runs no code) and ``<name>.json`` (what it is: the task and its options,
the model config, the command that trained it, its step count, its held-out metric and the weights'
sha256). :func:`load` checks the sha256 before it builds the model. ``benchmarks/train_suite.py``
trains and exports them; :func:`export` turns any ``tca train`` checkpoint into this form.

``gym.make("TreeRetrieval-v0", predictor="pretrained:copy-easy")`` (or one of the ids in
:data:`ENV_IDS`) builds the environment on a shipped predictor and its task.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .model import ModelConfig, ReTreever

DIR = Path(__file__).parent / "pretrained"
PREFIX = "pretrained:"

#: benchmark env id -> shipped predictor (its task and options come from the predictor's JSON)
ENV_IDS: dict[str, str] = {
    "TreeRetrieval-Copy-Easy-v0": "copy-easy",
    "TreeRetrieval-Copy-Medium-v0": "copy-medium",
    "TreeRetrieval-GP-v0": "gp",
    "TreeRetrieval-Recall-v0": "recall",
}

#: the task sizes an id fixes where its predictor was trained on a range (a task's size options only)
ENV_TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "TreeRetrieval-Recall-v0": {"context_len": 512, "num_queries": 64},  # 512 pairs: episodes of 8 steps
}


def available() -> list[str]:
    """Names of the shipped predictors."""
    return sorted(p.stem for p in DIR.glob("*.json"))


def info(name: str) -> dict[str, Any]:
    """A shipped predictor's description (its JSON)."""
    path = DIR / f"{_strip(name)}.json"
    if not path.is_file():
        raise ValueError(f"no shipped predictor {name!r}; shipped: {available()}")
    return json.loads(path.read_text())


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(name: str, device: str | torch.device = "cpu") -> tuple[ReTreever, dict[str, Any]]:
    """The shipped predictor ``name`` (in eval mode) and its description; the weights' sha256 must match."""
    from safetensors.torch import load_file

    meta = info(name)
    weights = DIR / f"{_strip(name)}.safetensors"
    digest = sha256(weights)
    if digest != meta["sha256"]:
        raise ValueError(f"shipped predictor {name!r}: {weights.name} has sha256 {digest}, its JSON says "
                         f"{meta['sha256']}; the file is damaged or was replaced")
    model = ReTreever(ModelConfig(**meta["model_config"]))
    model.load_state_dict(load_file(weights, device="cpu"))
    return model.to(device).eval(), meta


def export(checkpoint: str | os.PathLike, name: str, command: str, out_dir: str | os.PathLike = DIR,
           note: str = "") -> dict[str, Any]:
    """Write a ``tca train`` checkpoint as ``<out_dir>/<name>.safetensors`` + ``<name>.json``."""
    from safetensors.torch import save_file

    from .checkpoint import load_predictor, task_of

    model, ckpt = load_predictor(checkpoint)
    tc = ckpt["train_config"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights))
    results = Path(checkpoint).parent / "results.json"
    metric = json.loads(results.read_text())["eval"] if results.is_file() else {}
    task, task_options = task_of(ckpt)
    meta = {"name": name, "task": task, "task_options": task_options,
            "model_config": ckpt["model_config"], "command": command, "steps": ckpt["step"],
            "batch_size": tc["batch_size"], "seed": tc["seed"], "held_out": metric,
            "eval": {"size": tc["eval_size"], "seed": tc["eval_seed"]},
            "sha256": sha256(weights), "note": note}
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def is_pretrained(predictor: Any) -> bool:
    return isinstance(predictor, str) and predictor.startswith(PREFIX)


def _strip(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name
