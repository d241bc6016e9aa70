"""TreeRetrieval-v0: API checks, determinism, pickling, registration, and the vector env against the single env."""

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import tca_env
from agents.attention import AttentionPolicy
from tca_env import search as S
from tca_env.env import TreeRetrievalEnv
from tca_env.model import ModelConfig, ReTreever
from tca_env.tasks import make_task
from tca_env.vector_env import TreeRetrievalVectorEnv

TINY = dict(d_model=16, nhead=2, dim_ff=32, emb_depth=2, encoder="constant")
COPY = {"seq_len": 32}  # 16 context tokens: k = 3 levels, leaf buckets of P = 2


def single(**kw):
    return TreeRetrievalEnv(**{"task_options": COPY, "model_options": TINY, "seed": 0, **kw})


def vector(num_envs, **kw):
    return TreeRetrievalVectorEnv(num_envs, **{"task_options": COPY, "model_options": TINY, "seed": 0, **kw})


def rollout(env, seed, episodes, action_seed=0):
    rng = np.random.default_rng(action_seed)
    out = []
    obs, _ = env.reset(seed=seed)
    for _ in range(episodes):
        done = False
        while not done:
            obs, r, term, trunc, info = env.step(int(rng.integers(2)))
            out.append((obs, r, term, trunc))
            done = term
        obs, _ = env.reset()
        out.append((obs,))
    return out


def same(a, b):
    return all(gym.utils.env_checker.data_equivalence(x, y, exact=True) for x, y in zip(a, b, strict=True))


# Both checkers flag the embedding Boxes: embeddings are unbounded by construction (linear layers and
# attention), so infinite bounds are the truthful space. SB3 also flags child_emb's 2-D shape: it is a
# set of b child vectors, which the child-attention extractor (and SB3's default flattening) consume.
ALLOWED = ("Box observation space minimum value is -infinity", "Box observation space maximum value is infinity",
           "child_emb has an unconventional shape")


def unexpected(caught):
    return [str(w.message) for w in caught if not any(a in str(w.message) for a in ALLOWED)]


def test_gymnasium_check_env_passes_through_make():
    env = gym.make("TreeRetrieval-v0", predictor="fresh", task_options=COPY, model_options=TINY, render_mode="ansi")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert unexpected(caught) == []


def test_sb3_check_env_passes():
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(single())
    assert unexpected(caught) == []


def test_episode_is_one_tree_level_per_step_and_rewards_only_at_the_leaf():
    env = single(render_mode="ansi")
    obs, info = env.reset(seed=3)
    k = env.queries.k
    assert k == 3 and obs["depth"] == 0 and obs["action_mask"].tolist() == [1, 1]
    for s in range(k):
        obs, r, term, trunc, info = env.step(1)
        assert trunc is False and term == (s == k - 1)
        assert obs["depth"] == s + 1
        if s < k - 1:
            assert r == 0.0
    assert r in (0.0, 1.0) and info["metric"] == r  # the copy task's reward is accuracy
    assert info["path"].tolist() == [0, 1, 3, 7]
    assert obs["action_mask"].tolist() == [0, 0] and not obs["child_emb"].any()
    text = env.render()
    assert "leaf bucket 7" in text and "predictor attention" in text
    with pytest.raises(ResetNeeded, match="reset"):
        env.step(0)


def test_observation_is_the_query_and_the_children_of_the_current_node():
    env = single()
    env.reset(seed=5)
    ctx = env.queries.ctx
    obs, *_ = env.step(0)  # query 0 of set 0, now at node 0 of level 1
    assert np.array_equal(obs["query_emb"], ctx.query_emb[0, 0].numpy())
    assert np.array_equal(obs["child_emb"], ctx.tree.nodes[2][0, 0:2].numpy())


def test_seeded_rollouts_are_identical_and_seeds_matter():
    a = rollout(single(), seed=7, episodes=20)
    b = rollout(single(), seed=7, episodes=20)
    c = rollout(single(), seed=8, episodes=20)
    assert same(a, b)
    assert not same(a, c)


def test_env_pickles_mid_episode():
    env = single()
    env.reset(seed=1)
    env.step(0)
    clone = pickle.loads(pickle.dumps(env))
    for _ in range(2):
        o1, r1, *_ = env.step(1)
        o2, r2, *_ = clone.step(1)
        assert same([o1, r1], [o2, r2])
    assert same(rollout(env, 4, 3), rollout(clone, 4, 3))


def test_depth_zero_trees_and_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="depth 0"):
        single(task_options={"seq_len": 4})  # 2 context tokens, b = 2
    with pytest.raises(ValueError, match="reward"):
        single(reward="mse")  # a classification head has no squared error
    with pytest.raises(ValueError, match="invalid_action"):
        single(invalid_action="ignore")
    with pytest.raises(ValueError, match="branch"):
        single(predictor=single().predictor, model_options=None, branch=3)
    with pytest.raises(ValueError, match="unknown task"):
        single(task="sudoku")
    env = single()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        env.step(2)
    longer = make_task("copy", seq_len=64).sample(1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="deeper"):
        env.reset(options={"batch": longer})


def test_masked_action_is_redirected_and_counted_or_refused():
    env = single()
    env.reset(seed=0)
    q = env.queries
    q.sub.tree.node_mask[1][0, 1] = False  # pretend the right child of the root holds only padding
    q._observe_children()
    assert env.action_masks().tolist() == [True, False]
    obs, r, term, trunc, info = env.step(1)
    assert info["invalid_action"] is True
    assert q.path[0, 0, 1] == 0  # went left
    for _ in range(q.k - 1):
        obs, r, term, trunc, info = env.step(0)
    assert info["invalid_actions"] == 1
    strict = single(invalid_action="error")
    strict.reset(seed=0)
    strict.queries.sub.tree.node_mask[1][0, 1] = False
    strict.queries._observe_children()
    with pytest.raises(ValueError, match="masked action"):
        strict.step(1)


def test_reward_kinds_and_predictor_mode_is_restored():
    env = single(reward="nce")
    env.predictor.train()
    env.reset(seed=0)
    for _ in range(3):
        obs, r, term, trunc, info = env.step(0)
    assert env.predictor.training  # stepping ran in eval mode and gave the mode back
    assert term and isinstance(r, float) and np.isfinite(r) and r != info["metric"]  # log 12 - CE, not accuracy


def test_predictor_from_checkpoint_path(tmp_path):
    from training.config import build_config
    from training.cotrain import Trainer

    cfg = build_config(task="copy", seq_len=32, steps=1, progress=False, eval_every=0, eval_size=4, eval_batch=4,
                       run_dir=str(tmp_path), **TINY)
    t = Trainer(cfg)
    path = t.save()
    env = TreeRetrievalEnv(task_options=COPY, predictor=str(path))
    obs, _ = env.reset(seed=0)
    assert obs["query_emb"].shape == (16,)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    with pytest.raises(ValueError, match="corrupt"):
        TreeRetrievalEnv(task_options=COPY, predictor=str(bad))


# ---------------------------------------------------------------------------------------- vector env

def test_vector_env_with_one_env_matches_the_single_env_step_for_step():
    env, venv = single(), vector(1)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=11)
    vobs, _ = venv.reset(seed=11)
    episodes = 0
    while episodes < 40:  # 16 queries per tree batch: crosses two batch boundaries
        a = int(rng.integers(2))
        obs, r, term, trunc, info = env.step(a)
        vobs_next, vr, vterm, vtrunc, vinfo = venv.step(np.array([a]))
        assert vr[0] == r and vterm[0] == term and not vtrunc[0]
        if term:  # same-step autoreset: the final observation is in info, the new one is returned
            episodes += 1
            assert same([obs], [vinfo["final_obs"][0]])
            assert vinfo["final_info"]["metric"][0] == info["metric"]
            obs, _ = env.reset()
        assert same([obs], [{k: v[0] for k, v in vobs_next.items()}])


@pytest.mark.parametrize("num_envs", [1, 3, 8, 16, 48])
def test_vector_greedy_descent_gives_the_fused_search_s(num_envs):
    """Every round layout (a slice of a set, whole sets, sets cut mid-way) retrieves the fused greedy S."""
    venv = vector(num_envs, batch_size=3, array_type="torch")
    model = venv.predictor
    policy = AttentionPolicy(model.readout)
    batch = venv.task.sample(3, torch.Generator().manual_seed(0))  # 3 sets x 16 queries
    obs, _ = venv.reset(seed=0, options={"batch": batch})
    paths = []
    with torch.no_grad():
        for _ in range(48 // num_envs):
            while True:
                a = policy(obs["query_emb"], obs["child_emb"], obs["action_mask"]).argmax(-1)
                obs, r, term, trunc, info = venv.step(a)
                if term.all():
                    paths.append(info["final_info"]["path"])
                    break
        model.eval()
        ctx = model.prepare(batch)
        fused = S.descend(ctx.kv, ctx.q, "greedy")
    path = torch.cat(paths).view(3, 16, -1)
    assert torch.equal(path, fused.path)
    s_env, s_fused = S.retrieved_set(ctx.tree, path), S.retrieved_set(ctx.tree, fused.path)
    assert torch.equal(s_env.index, s_fused.index) and torch.equal(s_env.mask, s_fused.mask)


def test_vector_env_autoreset_modes():
    k = 3
    nxt = vector(16, autoreset_mode=AutoresetMode.NEXT_STEP)
    assert nxt.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, _ = nxt.reset(seed=0)
    first = obs["child_emb"].copy()  # copy-task queries are positions only: the context tells batches apart
    for _ in range(k):
        obs, r, term, trunc, info = nxt.step(np.zeros(16, dtype=np.int64))
    assert term.all() and "metric" in info and obs["depth"][0] == k
    obs, r, term, trunc, info = nxt.step(np.ones(16, dtype=np.int64))  # ignored: starts the next batch
    assert not term.any() and not r.any() and obs["depth"][0] == 0 and not np.array_equal(obs["child_emb"], first)

    off = vector(16, autoreset_mode="Disabled")
    off.reset(seed=0)
    for _ in range(k):
        off.step(np.zeros(16, dtype=np.int64))
    with pytest.raises(ResetNeeded, match="reset"):
        off.step(np.zeros(16, dtype=np.int64))
    with pytest.raises(ValueError, match="reset_mask"):
        off.reset(options={"reset_mask": np.arange(16) < 8})
    obs, _ = off.reset(options={"reset_mask": np.ones(16, dtype=bool)})
    assert obs["depth"][0] == 0


def test_vector_env_torch_arrays_and_round_errors():
    venv = vector(8, array_type="torch")
    obs, _ = venv.reset(seed=0)
    assert isinstance(obs["child_emb"], torch.Tensor) and obs["child_emb"].shape == (8, 2, 16)
    obs, r, term, trunc, info = venv.step(torch.zeros(8, dtype=torch.long))
    assert isinstance(r, torch.Tensor) and isinstance(info["invalid_action"], torch.Tensor)
    assert venv.action_masks().shape == (8, 2)
    with pytest.raises(ValueError, match="whole rounds"):
        vector(5, batch_size=1).reset(seed=0)
    with pytest.raises(ValueError, match="expected 8 actions"):
        venv.step(torch.zeros(3, dtype=torch.long))


def test_vector_env_records_finished_batches_for_replay():
    venv = vector(16, record_batches=True, array_type="torch")
    venv.reset(seed=0)
    rewards = []
    for _ in range(2 * 3):
        obs, r, term, *_ = venv.step(torch.ones(16, dtype=torch.long))
        if term.all():
            rewards.append(r)
    done = venv.pop_finished()
    assert len(done) == 2 and venv.pop_finished() == []
    assert done[0].actions.shape == (1, 16, 3) and (done[0].actions == 1).all()
    assert torch.equal(done[1].reward.flatten(), rewards[1])


# -------------------------------------------------------------------------------------- registration

def test_registration_is_idempotent_and_make_vec_gives_the_native_env():
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(tca_env)
    for env_id in tca_env.ENV_IDS:
        assert env_id in gym.registry
    venv = gym.make_vec("tca_env/TreeRetrieval-v0", num_envs=4, vectorization_mode="vector_entry_point",
                        predictor="fresh", task_options=COPY, model_options=TINY)
    assert isinstance(venv, TreeRetrievalVectorEnv) and venv.num_envs == 4
    obs, _ = venv.reset(seed=0)
    assert obs["child_emb"].shape == (4, 2, 16)
    # without arguments, the vector env gets the same shipped predictor and task as gym.make
    shipped = gym.make_vec("TreeRetrieval-v0", num_envs=2, vectorization_mode="vector_entry_point")
    assert shipped.task.seq_len == gym.make("TreeRetrieval-v0").unwrapped.task.seq_len == 64


def test_make_by_module_id_in_a_fresh_interpreter():
    code = ("import gymnasium as gym; env = gym.make('tca_env:TreeRetrieval-v0', predictor='fresh', "
            "task_options={'seq_len': 16}, "
            "model_options={'d_model': 16, 'nhead': 2, 'encoder': 'constant'}); o, _ = env.reset(seed=0); "
            "print(type(env.unwrapped).__name__, o['child_emb'].shape)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "TreeRetrievalEnv (2, 16)" in res.stdout


def test_given_predictor_is_shared_not_copied():
    task = make_task("copy", **COPY)
    model = ReTreever(ModelConfig.for_task(task, **TINY))
    env = TreeRetrievalEnv(task=task, predictor=model)
    venv = TreeRetrievalVectorEnv(4, task=task, predictor=model)
    assert env.predictor is model and venv.predictor is model


def test_step_before_reset_bad_actions_and_unknown_reset_options_are_errors():
    env = gym.make("TreeRetrieval-v0", predictor="fresh", task="copy", task_options={"seq_len": 16}, seed=0).unwrapped
    vec = TreeRetrievalVectorEnv(4, task="copy", task_options={"seq_len": 16}, seed=0)
    with pytest.raises(ResetNeeded, match="reset"):
        env.step(0)
    with pytest.raises(ResetNeeded, match="reset"):
        vec.step(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"bacth": None})
    with pytest.raises(ValueError, match="unknown reset option"):
        vec.reset(options={"sede": 1})
    env.reset(seed=0)
    for bad in (1.7, "1", True, np.float32(1.0), np.array(1.0), np.array([1]), torch.tensor(1.0)):
        with pytest.raises(TypeError, match="integer"):
            env.step(bad)
    # numpy integers and 0-d integer arrays / tensors are actions
    for good in (np.int64(1), np.array(0), torch.tensor(1)):
        env.reset()
        assert env.step(good)[0]["depth"] == 1
    vec.reset(seed=0)
    with pytest.raises(TypeError, match="integers"):
        vec.step(np.full(4, 1.0))
    vec.step(np.ones(4, dtype=np.int32))


def test_sb3_make_vec_env_and_rgb_frames():
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env("TreeRetrieval-v0", n_envs=2, seed=0,
                        env_kwargs={"predictor": "fresh", "task_options": {"seq_len": 16}})
    obs = venv.reset()
    assert obs["child_emb"].shape[0] == 2
    obs, reward, done, info = venv.step(np.array([0, 1]))
    assert not done.any()
    obs, reward, done, info = venv.step(np.array([1, 0]))
    assert done.all() and set(reward.tolist()) <= {0.0, 1.0}
    venv.close()

    env = gym.make("TreeRetrieval-v0", predictor="fresh", task_options={"seq_len": 16}, render_mode="rgb_array",
                   seed=0)
    env.reset()
    env.step(1)
    frame = env.render()
    row, W = TreeRetrievalEnv.frame_row, TreeRetrievalEnv.frame_width
    assert frame.dtype == np.uint8 and frame.shape == (3 * row, W, 3)  # k = 2 levels + the root
    blue = np.array([31, 78, 160], np.uint8)
    assert (frame[row, W // 2 + 1] == blue).all() and not (frame[row, W // 2 - 1] == blue).all()  # child 1 taken
    env.step(0)
    frame = env.render()
    assert (frame[2 * row, W // 2 + 1] == blue).all()  # node 2 of level 2 spans the third quarter
    assert not (frame[2 * row, 3 * W // 4 + 1] == blue).all()
