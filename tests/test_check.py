"""Your own task end to end, and the check that a task's reward depends on the path."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from tca_env.check import check_task, predictor_policy
from tca_env.tasks import make_task
from tca_env.vector_env import TreeRetrievalVectorEnv
from training.cli import main

OWN_TASK = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from tca_env.tasks import Batch, Task


    class LeakyLookup(Task):
        """Query j asks for context token j's class, and (a flaw on purpose) also carries it."""

        name = "leaky"
        head = "class"
        x_dim = 4
        y_dim = 0
        out_dim = 4
        ordering = "natural"
        reward = "acc"
        sequential = True

        def __init__(self, n=8):
            self.n = n

        @property
        def max_context(self):
            return self.n

        @property
        def max_position(self):
            return self.n

        def sample(self, batch_size, generator, device="cpu", split="train"):
            tok = torch.randint(0, 4, (batch_size, self.n), generator=generator)
            x = F.one_hot(tok, 4).float()
            pos = torch.arange(self.n)
            return Batch(xc=x, yc=None, xt=x.clone(), yt=tok, pc=pos, pt=pos.clone()).to(device)
''')


def test_predictor_policy_is_the_envs_own_attention_policy():
    env = TreeRetrievalVectorEnv(8, task="copy", task_options={"seq_len": 32}, seed=0, array_type="torch")
    env.reset(seed=0)
    q = env.queries
    for _ in range(q.k):
        pi = predictor_policy(env.predictor, q.query_emb, q.child_emb, q.mask)
        torch.testing.assert_close(pi.sum(-1), torch.ones(8))
        env.step(pi.argmax(-1))
        torch.testing.assert_close(pi, q.policy_probs)  # what the env computed for the step just taken


def test_fresh_predictor_reward_ignores_the_path():
    result = check_task("copy", None, task_options={"seq_len": 16}, episodes=256, num_envs=64)
    assert not result.path_matters and "WARNING" in result.report()
    assert set(result.reward) == {"greedy", "random", "leftmost"}
    assert all(0.0 <= v <= 1.0 for v in result.reward.values())


def test_own_task_trains_evaluates_and_is_checked_from_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_tasks.py").write_text(OWN_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(make_task("my_tasks:LeakyLookup", n=8).sample(2, torch.Generator()).xc, torch.Tensor)
    with pytest.raises(ValueError, match="has no 'Nope'"):
        make_task("my_tasks:Nope")
    run = tmp_path / "run"
    flags = ["--task", "my_tasks:LeakyLookup", "--task-args", '{"n": 8}', "--encoder", "constant", "--d-model", "16",
             "--nhead", "2", "--dim-ff", "32", "--emb-depth", "2", "--batch-size", "16", "--steps", "300",
             "--eval-every", "0", "--eval-size", "64", "--progress", "false", "--run-dir", str(run)]
    assert main(["train", *flags]) == 0
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--json"]) == 0
    capsys.readouterr()
    # The query carries the answer: the trained predictor ignores S, and the check says so (exit status 1).
    assert main(["check-task", "--checkpoint", str(run / "checkpoint.pt"), "--episodes", "512"]) == 1
    out = capsys.readouterr().out
    assert "WARNING" in out
    greedy = float(out.split("greedy")[1].split()[1])
    assert greedy > 0.9  # it did learn: from the query alone


def test_evaluate_is_one_protocol_for_sb3_models_agents_and_callables():
    from stable_baselines3 import PPO

    from agents.sb3 import make_agent
    from tca_env import evaluate
    from tca_env.vector_env import TreeRetrievalVectorEnv

    env = TreeRetrievalVectorEnv(64, task="copy", task_options={"seq_len": 16}, seed=0)
    predictor = make_agent("predictor", env)
    out = evaluate(predictor, env=env, episodes=500, seed=3)
    assert out["episodes"] == 500 and 0.0 <= out["reward"] <= 1.0 and out["reward_ci95"] > 0
    # the predictor agent is the env's own greedy attention policy: the same episodes score the same
    def greedy(obs):
        q, c, m = (torch.as_tensor(obs[k]) for k in ("query_emb", "child_emb", "action_mask"))
        return predictor_policy(env.predictor, q, c, m.bool()).argmax(-1).numpy()

    assert evaluate(greedy, env=env, episodes=500, seed=3) == out

    def left(obs):
        return np.zeros(len(obs["action_mask"]), dtype=np.int64)

    # the same episodes for every policy: a constant policy's result does not depend on what ran before
    assert evaluate(left, env=env, episodes=300, seed=3) == evaluate(left, env=env, episodes=300, seed=3)
    ppo = PPO("MultiInputPolicy", make_vec_env_for(env), n_steps=8, batch_size=64, verbose=0)
    assert 0.0 <= evaluate(ppo, env=env, episodes=200, seed=3)["reward"] <= 1.0


def make_vec_env_for(env):
    from agents.sb3 import SB3VecEnv

    return SB3VecEnv(env)


def test_correct_leaf_oracle_reaches_the_target_token():
    from agents.sb3 import make_agent
    from tca_env import search as S
    from tca_env.vector_env import TreeRetrievalVectorEnv

    env = TreeRetrievalVectorEnv(32, task="copy", task_options={"seq_len": 64}, seed=0, array_type="torch")
    oracle = make_agent("correct_leaf", env)
    obs, _ = env.reset(seed=0)
    q = env.queries
    while True:
        obs, r, term, _, info = env.step(torch.as_tensor(oracle.predict(obs)[0]))
        if bool(term.all()):
            break
    path = info["final_info"]["path"]  # [E, k+1]
    # brute force: the retrieved set of the taken path holds query m's target token n-1-m
    m = torch.arange(32) % q.batch_M
    target = q.batch_M - 1 - m
    tok = S.bucket_index(q.shape, path[:, -1])  # [E, P] slots of the leaf = token indices (natural order)
    assert (tok == target.unsqueeze(1)).any(1).all()
    with pytest.raises(ValueError, match="target tokens"):
        make_agent("correct_leaf", TreeRetrievalVectorEnv(4, task="gp", seed=0))
