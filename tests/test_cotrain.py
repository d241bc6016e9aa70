"""The co-training loop: equivalence with the fused step, every agent from the CLI, TensorBoard, checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.cli import main
from training.config import build_config
from training.cotrain import CoTrainer, Trainer, make_trainer

TINY = dict(task="copy", seq_len=32, d_model=16, nhead=2, dim_ff=32, emb_depth=2, encoder="constant", dropout=0.1,
            batch_size=4, eval_size=8, eval_batch=8, log_every=2, progress=False, eval_every=0, ckpt_every=0)
TINY_FLAGS = ["--task", "copy", "--seq-len", "16", "--d-model", "16", "--nhead", "2", "--dim-ff", "32",
              "--emb-depth", "2", "--encoder", "constant", "--batch-size", "2", "--eval-size", "4", "--log-every", "1",
              "--progress", "false"]


def tiny(tmp_path, **kw):
    return build_config(**{**TINY, "run_dir": str(tmp_path / "run"), **kw})


@pytest.mark.parametrize("baseline", ["none", "batch_mean", "ema"])
def test_reinforce_through_the_env_is_the_fused_step(tmp_path, baseline):
    """Same batch, seed and sampled actions: same losses, gradients and updated parameters.

    Without dropout: the copy task's position-encoding dropout changes the tree a training-mode forward
    builds, while the env builds its trees in eval mode, so the two would sample from different policies."""
    fused = Trainer(tiny(tmp_path / "f", rl_baseline=baseline, dropout=0.0))
    co = CoTrainer(tiny(tmp_path / "c", rl_baseline=baseline, agent="reinforce", dropout=0.0))
    co.model.load_state_dict(fused.model.state_dict())
    batch = fused.task.sample(4, torch.Generator().manual_seed(1))

    fused.model.train()
    torch.manual_seed(5)  # dropout masks
    out = fused.model(batch, search="sample", generator=torch.Generator().manual_seed(123))
    out.loss.backward()

    co.agent.generator.manual_seed(123)
    fb, _ = co.rollout(batch)  # the agent samples through the env from its observations
    assert torch.equal(fb.actions, out.descent.actions)
    torch.manual_seed(5)
    loss, terms = co.losses(fb)
    loss.backward()
    for key in ("loss", "loss_tca", "loss_ca", "loss_rl", "reward", "entropy"):
        torch.testing.assert_close(terms[key], out.terms[key], rtol=1e-6, atol=1e-6)
    grads = 0
    for (name, p), (_, p2) in zip(fused.model.named_parameters(), co.model.named_parameters(), strict=True):
        assert (p.grad is None) == (p2.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p2.grad, p.grad, rtol=1e-5, atol=1e-7)
            grads += 1
    assert grads > 20  # the RL term reaches the aggregator, embedders and read-out as in the paper

    # And one full update (clipping, Adam, schedule) lands on the same parameters.
    fused.model.zero_grad()
    co.model.zero_grad()
    fused.gen.manual_seed(123)
    torch.manual_seed(5)
    fused.train_step(batch)
    co.agent.generator.manual_seed(123)
    fb, _ = co.rollout(batch)
    torch.manual_seed(5)
    co.learn_from(fb)
    for (name, p), (_, p2) in zip(fused.model.named_parameters(), co.model.named_parameters(), strict=True):
        torch.testing.assert_close(p2, p, rtol=1e-5, atol=1e-6, msg=name)


def test_external_agents_leave_rl_to_the_agent_and_observations_detached(tmp_path):
    co = CoTrainer(tiny(tmp_path, agent="random"))
    assert co.model.cfg.lambda_rl == 0.0 and co.model.cfg.rl_baseline == "none"
    fb, _ = co.rollout()
    loss, terms = co.losses(fb)
    assert "loss_rl" not in terms and set(terms) >= {"loss", "loss_tca", "loss_ca", "accuracy"}
    loss.backward()
    assert co.model.aggregator.attn.q.weight.grad is not None  # internal nodes learn through L_TCA (siblings in S)


@pytest.mark.parametrize("agent", ["reinforce", "ppo", "a2c", "dqn", "maskable_ppo", "random"])
def test_every_agent_trains_from_the_cli_and_evaluates_greedily(tmp_path, agent, capsys):
    run = tmp_path / agent
    assert main(["train", *TINY_FLAGS, "--agent", agent, "--steps", "3", "--run-dir", str(run)]) == 0
    report = json.loads((run / "results.json").read_text())
    assert report["agent"] == agent and report["steps"] == 3
    assert 0.0 <= report["eval"]["test/accuracy"] <= 1.0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["test/accuracy"] == pytest.approx(report["eval"]["test/accuracy"])
    if agent in ("ppo", "a2c", "dqn", "maskable_ppo"):
        assert (run / "checkpoint.agent.zip").is_file()


def test_tensorboard_run_of_an_sb3_agent_holds_predictor_and_agent_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.cli", "train", *TINY_FLAGS, "--agent", "ppo", "--steps", "4",
           "--eval-every", "2", "--run-dir", str(run)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # one run directory, one writer
    ea = EventAccumulator(str(run))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    predictor = {"train/loss", "train/loss_tca", "train/loss_ca", "train/accuracy", "train/lr", "train/steps_per_sec",
                 "eval/test/accuracy"}
    agent = {"agent/reward", "agent/metric", "agent/entropy", "agent/invalid_action_rate",
             "agent/query_steps_per_sec", "agent/train/policy_gradient_loss", "agent/rollout/ep_rew_mean"}
    assert predictor <= tags, predictor - tags
    assert agent <= tags, agent - tags


def test_seeded_cotraining_is_deterministic(tmp_path):
    a = CoTrainer(tiny(tmp_path / "a", agent="reinforce", steps=3))
    a.fit()
    b = CoTrainer(tiny(tmp_path / "b", agent="reinforce", steps=3))
    b.fit()
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_resume_restores_predictor_and_agent(tmp_path):
    first = CoTrainer(tiny(tmp_path, agent="reinforce", steps=2, rl_baseline="ema"))
    first.fit()
    ema = first.agent.reward_ema
    resumed = CoTrainer(tiny(tmp_path, agent="reinforce", steps=4, rl_baseline="ema", resume=True))
    assert resumed.step == 2 and resumed.agent.reward_ema == ema
    resumed.fit()
    assert resumed.step == 4
    with pytest.raises(ValueError, match=r"'agent': \('random', 'reinforce'\)"):
        CoTrainer(tiny(tmp_path, agent="random", steps=4, resume=True))


def test_bad_agent_configurations_are_refused(tmp_path):
    with pytest.raises(ValueError, match="decoder tca"):
        build_config(agent="ppo", decoder="ca")
    with pytest.raises(ValueError, match="JSON"):
        build_config(agent="ppo", agent_options="{n_steps: 3}")
    with pytest.raises(ValueError, match="lambda-rl"):
        CoTrainer(tiny(tmp_path, agent="ppo", lambda_rl=1.0))
    with pytest.raises(ValueError, match="CoTrainer"):
        Trainer(tiny(tmp_path, agent="ppo"))
    assert type(make_trainer(tiny(tmp_path))) is Trainer
    assert main(["train", *TINY_FLAGS, "--agent", "ppo", "--agent-options", "[1]", "--run-dir", str(tmp_path)]) == 2
