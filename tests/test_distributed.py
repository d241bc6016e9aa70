"""Data-parallel training under torchrun (2 processes, gloo, CPU): one run's outputs, the same parameters as one
process over the same global batches, resume on another process count, and a clear error for agents."""

import json
import os
import subprocess
import sys

import pytest
import torch

SMALL = ["--task", "copy", "--seq-len", "16", "--encoder", "constant", "--d-model", "16", "--nhead", "2",
         "--dim-ff", "32", "--emb-depth", "2", "--batch-size", "4", "--eval-size", "8", "--eval-batch", "4",
         "--eval-every", "0", "--log-every", "2", "--progress", "false"]


def train(args: list[str], procs: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = (launcher if procs > 1 else [sys.executable]) + ["-m", "training.cli", "train", *SMALL, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def params(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6 steps of the ca baseline (no sampled search: the run is a deterministic function of its
    batches) on 2 processes and on 1."""
    root = tmp_path_factory.mktemp("ddp")
    out = {}
    for procs in (2, 1):
        run_dir = root / f"p{procs}"
        p = train(["--decoder", "ca", "--steps", "6", "--run-dir", str(run_dir)], procs)
        assert p.returncode == 0, p.stderr[-3000:]
        out[procs] = (run_dir, p)
    return out


def test_two_processes_write_one_run(runs):
    run_dir, p = runs[2]
    assert sorted(f.name for f in run_dir.iterdir() if not f.name.startswith("events")) == ["checkpoint.pt",
                                                                                          "results.json"]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    report = json.loads((run_dir / "results.json").read_text())
    assert (report["world_size"], report["backend"], report["steps"]) == (2, "gloo", 6)
    assert p.stdout.count("done:") == 1  # rank 0 alone reports


def test_two_processes_learn_what_one_process_learns(runs):
    """Each rank takes half of the global batch and gradients are averaged: the parameters after 6 steps equal a
    single process's over the same global batches, up to float rounding."""
    a, b = params(runs[2][0]), params(runs[1][0])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_a_two_process_checkpoint_resumes_on_one_process(runs, tmp_path):
    import shutil

    run_dir = tmp_path / "resumed"
    shutil.copytree(runs[2][0], run_dir)
    p = train(["--decoder", "ca", "--steps", "8", "--run-dir", str(run_dir), "--resume", "true"], 1)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((run_dir / "results.json").read_text())
    assert (report["world_size"], report["steps"]) == (1, 8)


def test_tca_and_the_reinforce_agent_train_on_two_processes_and_sb3_is_refused(tmp_path):
    p = train(["--decoder", "tca", "--steps", "4", "--run-dir", str(tmp_path / "tca")], 2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "tca" / "results.json").read_text())["world_size"] == 2
    # the REINFORCE agent co-trains through each process's own env shard
    p = train(["--agent", "reinforce", "--lambda-rl", "0", "--steps", "3", "--run-dir", str(tmp_path / "agent")], 2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "agent" / "results.json").read_text())["world_size"] == 2
    p = train(["--agent", "ppo", "--lambda-rl", "0", "--steps", "2", "--run-dir", str(tmp_path / "ppo")], 2)
    assert p.returncode != 0 and "no distributed training" in p.stderr
