"""Agents: the attention policy against the search, REINFORCE's loss, the SB3 adapter, the extractor, make_agent."""

import numpy as np
import pytest
import torch
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import get_action_masks, is_masking_supported
from stable_baselines3 import A2C, DQN, PPO

from agents.attention import AttentionPolicy, ReinforceAgent
from agents.base import Rollout
from agents.sb3 import AGENT_NAMES, ChildAttentionExtractor, RandomAgent, SB3VecEnv, make_agent, predict
from tca_env.vector_env import TreeRetrievalVectorEnv

TINY = dict(d_model=16, nhead=2, dim_ff=32, emb_depth=2, encoder="constant")
COPY = {"seq_len": 32}


def vector(num_envs=16, **kw):
    return TreeRetrievalVectorEnv(num_envs, **{"task_options": COPY, "model_options": TINY, "seed": 0, **kw})


def test_attention_policy_on_observations_is_the_predictors_search_policy():
    venv = vector(16, array_type="torch")
    policy = AttentionPolicy(venv.predictor.readout)
    obs, _ = venv.reset(seed=2)
    for _ in range(venv.queries.k):
        with torch.no_grad():
            logp = policy(obs["query_emb"], obs["child_emb"], obs["action_mask"])
        action = torch.arange(16) % 2
        obs, *_ = venv.step(action)
        # The env ran search.step on the tree's own projections: same distribution as from the observation.
        torch.testing.assert_close(logp.exp(), venv.queries.policy_probs, rtol=1e-5, atol=1e-6)


def test_reinforce_loss_is_the_closed_form_with_each_baseline():
    predictor = vector().predictor
    lp, ent, r = torch.tensor([-0.5, -1.0, -2.0]), torch.tensor([0.6, 0.5, 0.1]), torch.tensor([1.0, 0.0, 1.0])
    agent = ReinforceAgent(predictor, entropy_coef=0.01)
    assert agent.loss(lp, ent, r) == pytest.approx(float(-(lp * r).mean() - 0.01 * ent.mean()))
    agent = ReinforceAgent(predictor, baseline="batch_mean", entropy_coef=0.0)
    assert agent.loss(lp, ent, r) == pytest.approx(float(-(lp * (r - r.mean())).mean()))
    agent = ReinforceAgent(predictor, baseline="ema", entropy_coef=0.0, ema_decay=0.9)
    assert agent.loss(lp, ent, r) == pytest.approx(float(-(lp * r).mean()))  # the average starts at 0
    assert agent.reward_ema == pytest.approx(0.1 * float(r.mean()))
    with pytest.raises(ValueError, match="baseline"):
        ReinforceAgent(predictor, baseline="median")


def test_standalone_reinforce_update_raises_the_rewarded_action():
    venv = vector(16, array_type="torch")
    agent = ReinforceAgent(venv.predictor, shared=False, lr=1e-2, entropy_coef=0.0)
    assert agent.policy.readout is not venv.predictor.readout
    obs, _ = venv.reset(seed=0)
    action, logp = agent.act(obs)
    before = logp.detach().gather(1, action.unsqueeze(1))
    stats = agent.update(Rollout(logp.gather(1, action.unsqueeze(1)).squeeze(1), torch.zeros(16), torch.ones(16), 1))
    assert "agent/loss" in stats
    after = agent.act(obs)[1].detach().gather(1, action.unsqueeze(1))
    assert (after > before).float().mean() > 0.8
    # a shared policy learns in the predictor's update (its replay loss), not in its own step
    shared = ReinforceAgent(venv.predictor)
    assert shared.update(Rollout(before.squeeze(1), torch.zeros(16), torch.ones(16), 1)) == {}
    assert agent.replay_loss(before, torch.zeros(16), torch.ones(16)) is None
    assert shared.replay_loss(before, torch.zeros(16), torch.ones(16)) is not None


def test_sb3_adapter_batches_autoresets_and_honours_seeds():
    venv = vector(16)
    env = SB3VecEnv(venv)
    env.seed(3)
    obs = env.reset()
    reference, _ = vector(16).reset(seed=3)
    assert np.array_equal(obs["child_emb"], reference["child_emb"])
    assert is_masking_supported(env) and get_action_masks(env).shape == (16, 2)
    assert env.get_attr("num_envs", [0, 1]) == [16, 16] and env.env_is_wrapped(object) == [False] * 16
    for _ in range(venv.queries.k):
        obs, reward, dones, infos = env.step(np.ones(16, dtype=np.int64))
        assert reward.dtype == np.float32 and len(infos) == 16
    assert dones.all() and obs["depth"][0] == 0  # same-step autoreset
    final = infos[5]["terminal_observation"]
    assert final["depth"] == venv.queries.k and not final["action_mask"].any()
    assert infos[5]["episode"]["r"] == reward[5] and infos[5]["episode"]["l"] == venv.queries.k
    with pytest.raises(ValueError, match="SAME_STEP"):
        SB3VecEnv(vector(16, autoreset_mode="NextStep"))


def test_child_attention_extractor_is_permutation_aware():
    venv = vector(8)
    ext = ChildAttentionExtractor(venv.single_observation_space, d_attn=8, nhead=2)
    g = torch.Generator().manual_seed(0)
    obs = {"query_emb": torch.randn(5, 16, generator=g), "child_emb": torch.randn(5, 2, 16, generator=g),
           "action_mask": torch.ones(5, 2), "depth": torch.nn.functional.one_hot(torch.arange(5) % 4, 4).float()}
    swapped = {**obs, "child_emb": obs["child_emb"].flip(1)}
    f, fs = ext(obs), ext(swapped)
    assert f.shape == (5, ext.features_dim) == (5, 2 * 2 + 2 + 8)
    scores, scores_s = f[:, :4].view(5, 2, 2), fs[:, :4].view(5, 2, 2)
    torch.testing.assert_close(scores_s, scores.flip(1))  # child c's scores follow child c
    torch.testing.assert_close(fs[:, 6:], f[:, 6:])  # the pooled summary does not depend on the order


def test_make_agent_registry():
    venv = vector(16)
    expected = {"ppo": PPO, "a2c": A2C, "dqn": DQN, "maskable_ppo": MaskablePPO}
    for name, cls in expected.items():
        agent = make_agent(name, venv, seed=0, policy_kwargs={"features_extractor_kwargs": {"d_attn": 8, "nhead": 2}})
        assert type(agent) is cls and isinstance(agent.get_env(), SB3VecEnv) and agent.gamma == 1.0
        extractor = agent.q_net.features_extractor if name == "dqn" else agent.policy.features_extractor
        assert isinstance(extractor, ChildAttentionExtractor) and extractor.features_dim == 2 * 2 + 2 + 8
    assert make_agent("ppo", venv, n_steps=6).n_steps == 6
    assert isinstance(make_agent("reinforce", venv), ReinforceAgent)
    assert isinstance(make_agent("random", venv), RandomAgent)
    assert set(AGENT_NAMES) == {"reinforce", "random", *expected}
    with pytest.raises(ValueError, match="unknown agent"):
        make_agent("sac", venv)
    with pytest.raises(TypeError, match="TreeRetrieval"):
        make_agent("ppo", object())


def test_random_agent_and_maskable_ppo_respect_masks():
    mask = np.array([[1, 0], [0, 1], [1, 1]] * 100, dtype=np.int8)
    obs = {"action_mask": mask}
    actions = RandomAgent(0).predict(obs)[0]
    assert (mask[np.arange(300), actions] == 1).all()
    assert set(actions[2::3]) == {0, 1}
    venv = vector(16)
    agent = make_agent("maskable_ppo", venv, seed=0)
    obs, _ = venv.reset(seed=0)
    obs["action_mask"][:, 1] = 0
    assert (predict(agent, obs, deterministic=False) == 0).all()


@pytest.mark.parametrize("name", ["reinforce", "ppo", "a2c", "dqn", "maskable_ppo"])
def test_each_agent_acts_and_sb3_ones_learn_on_the_env(name):
    venv = vector(16)
    agent = make_agent(name, venv, **({} if name == "reinforce" else {"seed": 0}))
    if name != "reinforce":
        agent.learn(16 * 3 * 3)
    obs, _ = venv.reset(seed=1)
    actions = predict(agent, obs)
    assert actions.shape == (16,) and set(np.unique(actions)) <= {0, 1}
