"""Trainer: determinism, resume, atomic checkpoints, CLI and TensorBoard output."""

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from training import checkpoint as ckpt_io
from training.cli import build_parser, main
from training.config import build_config
from training.cotrain import Trainer

TINY = dict(task="copy", seq_len=16, d_model=16, nhead=2, dim_ff=32, emb_depth=2, encoder="constant",
            batch_size=4, eval_size=8, eval_batch=8, log_every=2, progress=False, eval_every=0, ckpt_every=0)


def tiny(tmp_path, **kw):
    return build_config(**{**TINY, "run_dir": str(tmp_path / "run"), **kw})


def params(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("decoder", ["tca", "ca", "perceiver"])
def test_seeded_runs_are_bit_identical(tmp_path, decoder):
    a = Trainer(tiny(tmp_path / "a", steps=4, decoder=decoder, dropout=0.1))
    a.fit()
    b = Trainer(tiny(tmp_path / "b", steps=4, decoder=decoder, dropout=0.1))
    b.fit()
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    c = Trainer(tiny(tmp_path / "c", steps=4, decoder=decoder, dropout=0.1, seed=1))
    c.fit()
    assert not all(torch.equal(pa[k], params(c)[k]) for k in pa)


def test_resume_continues_exactly(tmp_path):
    full = Trainer(tiny(tmp_path / "full", steps=6, dropout=0.1))
    full.fit()
    first = Trainer(tiny(tmp_path / "part", steps=6, dropout=0.1))
    for _ in range(3):
        first.train_step(first.task.sample(4, first.gen))
        first.step += 1
    first.save()
    resumed = Trainer(tiny(tmp_path / "part", steps=6, dropout=0.1, resume=True))
    assert resumed.step == 3
    resumed.fit()
    pf, pr = params(full), params(resumed)
    assert all(torch.equal(pf[k], pr[k]) for k in pf)


def test_resume_refuses_a_different_model(tmp_path):
    t = Trainer(tiny(tmp_path, steps=1))
    t.save()
    with pytest.raises(ValueError, match="another model config"):
        Trainer(tiny(tmp_path, steps=1, d_model=32, resume=True))


def test_init_from_takes_the_weights_of_a_shorter_task_and_nothing_else(tmp_path):
    """A curriculum: weights trained at L = 16 start a run at L = 32 (the model config differs only in
    max_context and in how training regularises and routes gradients: dropout, bptt); the new run's
    optimiser and step start afresh, and its first step moves from those weights."""
    short = Trainer(tiny(tmp_path / "short", steps=3))
    short.fit()
    longer = Trainer(tiny(tmp_path / "long", steps=2, seq_len=32, dropout=0.1, bptt=True,
                          init_from=str(short.ckpt_path)))
    assert longer.model.cfg.max_context == 2 * short.model.cfg.max_context
    assert longer.model.cfg.bptt and not short.model.cfg.bptt
    ps, pl = params(short), params(longer)
    assert all(torch.equal(ps[k], pl[k]) for k in ps)
    assert longer.step == 0 and not longer.opt.state
    fresh = Trainer(tiny(tmp_path / "fresh", steps=2, seq_len=32, dropout=0.1))
    assert not all(torch.equal(ps[k], params(fresh)[k]) for k in ps)
    longer.fit()
    assert not all(torch.equal(ps[k], params(longer)[k]) for k in ps)


def test_init_from_may_split_the_weights_into_other_heads(tmp_path):
    """--init-from across head counts: every weight carries over unchanged (the projections are [D, D] whatever
    the split), and the model computes with the new split: the greedy read-out differs from the old model's."""
    multi = Trainer(tiny(tmp_path / "multi", steps=2))
    multi.fit()
    assert multi.model.cfg.nhead > 1
    one = Trainer(tiny(tmp_path / "one", steps=1, nhead=1, init_from=str(multi.ckpt_path)))
    assert one.model.cfg.nhead == 1 and one.model.readout.attn.nhead == 1
    pm, p1 = params(multi), params(one)
    assert pm.keys() == p1.keys() and all(torch.equal(pm[k], p1[k]) for k in pm)
    batch = multi.task.sample(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_m, out_1 = multi.model.eval().predict(batch), one.model.eval().predict(batch)
    assert not torch.allclose(out_m, out_1)


def test_init_from_refuses_another_model(tmp_path):
    t = Trainer(tiny(tmp_path / "a", steps=1))
    t.save()
    with pytest.raises(ValueError, match="init-from.*d_model"):
        Trainer(tiny(tmp_path / "b", steps=1, d_model=32, init_from=str(t.ckpt_path)))
    p = Trainer(tiny(tmp_path / "p", steps=1, decoder="perceiver"))
    p.save()
    with pytest.raises(ValueError, match="do not fit"):  # its latents follow max_context
        Trainer(tiny(tmp_path / "q", steps=1, decoder="perceiver", seq_len=64, init_from=str(p.ckpt_path)))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    t = Trainer(tiny(tmp_path, steps=1))
    path = t.save()
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        t.save()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_corrupt_or_foreign_checkpoint_gives_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        ckpt_io.load(bad)
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a tree-retrieval checkpoint"):
        ckpt_io.load(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError):
        ckpt_io.load(tmp_path / "missing.pt")
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    # a checkpoint of the earlier layer forms says so instead of failing on mismatched weights
    torch.save({"format": "tree-retrieval-checkpoint-v1", "model": {}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="earlier version"):
        ckpt_io.load(tmp_path / "old.pt")


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": ckpt_io.FORMAT, "model": {}, "model_config": {}, "train_config": {}, "step": 0,
                "x": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="refused to load"):
        ckpt_io.load(evil)
    with pytest.raises(ValueError, match="refused to load"):
        gym.make("TreeRetrieval-v0", predictor=str(evil))
    assert main(["eval", "--checkpoint", str(evil)]) == 2
    assert not marker.exists()


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="steps"):
        build_config(steps=0)
    with pytest.raises(ValueError, match="no preset"):
        build_config("huge", task="copy")
    with pytest.raises(ValueError, match="unknown task"):
        Trainer(build_config(task="sudoku"))


def test_help_explains_every_flag():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name, p in sub.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, f"tca {name} {action.option_strings} has no help"


def test_cli_train_writes_tensorboard_scalars_and_eval_reads_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "training.cli", "train", "--task", "copy", "--seq-len", "16", "--steps", "4",
           "--batch-size", "4", "--eval-size", "8", "--log-every", "2", "--d-model", "16", "--nhead", "2",
           "--progress", "false", "--run-dir", str(run)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=300)
    assert res.returncode == 0, res.stderr
    assert "test/accuracy=" in res.stdout
    ea = EventAccumulator(str(run))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ("loss", "loss_tca", "loss_ca", "loss_rl", "reward", "accuracy", "entropy", "tokens", "token_frac",
                "steps_per_sec", "lr"):
        assert f"train/{tag}" in tags, tag
    assert "eval/test/accuracy" in tags
    res = subprocess.run([sys.executable, "-m", "training.cli", "eval", "--checkpoint", str(run / "checkpoint.pt"),
                          "--json"], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr
    assert "test/accuracy" in res.stdout


def test_run_dir_defaults_per_configuration_and_a_second_run_is_refused(tmp_path):
    assert build_config(task="gp", decoder="ca").run_dir == "runs/gp-ca-fused"
    assert build_config("quick", task="copy").run_dir == "runs/copy-tca-fused-quick"
    Trainer(tiny(tmp_path, steps=2)).fit()
    run = tmp_path / "run"
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(tiny(tmp_path, steps=2, decoder="ca")).fit()
    assert (run / "checkpoint.pt").read_bytes() == before  # nothing written
    with pytest.raises(ValueError, match="another configuration"):
        Trainer(tiny(tmp_path, steps=4, decoder="ca", resume=True))
    Trainer(tiny(tmp_path, steps=2, decoder="ca", overwrite=True)).fit()
    assert torch.load(run / "checkpoint.pt")["train_config"]["decoder"] == "ca"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the replaced run's events are gone


def test_lr_horizon_sets_the_cosine_decay_length(tmp_path):
    import math

    t = Trainer(tiny(tmp_path, steps=4, lr_horizon=100))
    t.fit()
    assert t.opt.param_groups[0]["lr"] == pytest.approx(5e-4 * (1 + math.cos(math.pi * 4 / 100)) / 2)
    t = Trainer(tiny(tmp_path, steps=4, overwrite=True))
    t.fit()
    assert t.opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the default horizon: --steps
    with pytest.raises(ValueError, match="lr-horizon"):
        build_config(steps=10, lr_horizon=5)
