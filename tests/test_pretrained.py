"""The shipped predictors behind the benchmark ids: integrity, strict task matching, a real search problem."""

from __future__ import annotations

import shutil
import subprocess
import sys

import gymnasium as gym
import pytest

import tca_env
from agents.sb3 import make_agent
from tca_env import pretrained
from tca_env.check import check_task
from tca_env.evaluation import evaluate
from tca_env.vector_env import TreeRetrievalVectorEnv
from training.config import build_config
from training.cotrain import Trainer

CLASSIFICATION = {name for name in pretrained.available() if pretrained.info(name)["model_config"]["head"] == "class"}


def test_every_benchmark_id_makes_offline_in_a_fresh_interpreter():
    assert set(tca_env.BENCHMARK_IDS.values()) <= set(pretrained.available())
    code = ("import gymnasium as gym, tca_env\n"
            "for env_id in tca_env.BENCHMARK_IDS:\n"
            "    env = gym.make(env_id); obs, _ = env.reset(seed=0); env.step(0); print(env_id)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PATH": "", "OMP_NUM_THREADS": "1", "HOME": "/nonexistent", "no_proxy": "*",
                              "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == list(tca_env.BENCHMARK_IDS)


@pytest.mark.parametrize("name", pretrained.available())
def test_shipped_weights_match_their_sha256_and_describe_themselves(name):
    meta = pretrained.info(name)
    assert pretrained.sha256(pretrained.DIR / f"{name}.safetensors") == meta["sha256"]
    for key in ("task", "task_options", "model_config", "command", "steps", "held_out", "sha256"):
        assert key in meta
    model, _ = pretrained.load(name)
    assert not model.training and model.cfg.decoder == "tca"


def test_damaged_weights_are_refused(tmp_path, monkeypatch):
    name = pretrained.available()[0]
    for ext in ("json", "safetensors"):
        shutil.copy(pretrained.DIR / f"{name}.{ext}", tmp_path / f"{name}.{ext}")
    blob = bytearray((tmp_path / f"{name}.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / f"{name}.safetensors").write_bytes(bytes(blob))
    monkeypatch.setattr(pretrained, "DIR", tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        pretrained.load(name)


@pytest.mark.parametrize("name", sorted(CLASSIFICATION))
def test_greedy_predictor_beats_random_by_0_3(name):
    result = check_task(pretrained.info(name)["task"], f"pretrained:{name}", episodes=2000, num_envs=500)
    assert result.reward["greedy"] - result.reward["random"] >= 0.3, result.report()


@pytest.mark.parametrize("env_id", sorted(i for i, n in tca_env.BENCHMARK_IDS.items() if n in CLASSIFICATION))
def test_on_each_classification_id_greedy_beats_random_by_0_3_in_accuracy(env_id):
    """On the id's own problem (its registered sizes) and the metric itself, accuracy: 2,000 fixed-seed episodes
    (the recall id rewards -CE; at N = 1,024, the top of its predictor's training range, the gap was 0.27-0.32
    in two samples, hence the id's N = 512)."""
    spec = gym.spec(env_id)
    env = TreeRetrievalVectorEnv(500, **spec.kwargs, reward="acc", seed=0)
    greedy = evaluate(make_agent("predictor", env), env=env, episodes=2000, seed=0)["reward"]
    rand = evaluate(make_agent("random", env, seed=0), env=env, episodes=2000, seed=0)["reward"]
    assert greedy - rand >= 0.3, (greedy, rand)


def test_a_predictor_brings_its_task_and_a_contradiction_is_an_error(tmp_path):
    env_id = next(i for i, n in tca_env.BENCHMARK_IDS.items() if n == "copy-easy")
    seq_len = pretrained.info("copy-easy")["task_options"]["seq_len"]
    assert gym.make(env_id).unwrapped.task.seq_len == seq_len
    assert gym.make(env_id, task_options={"seq_len": seq_len}).unwrapped.task.seq_len == seq_len
    with pytest.raises(ValueError, match=rf"'seq_len': \(256, {seq_len}\)"):
        gym.make(env_id, task_options={"seq_len": 256})
    with pytest.raises(ValueError, match="trained on task 'copy'"):
        gym.make(env_id, task="gp")
    fresh = gym.make(env_id, predictor="fresh", task_options={"seq_len": 16}).unwrapped
    assert fresh.task.seq_len == 16
    # the same rule for a checkpoint of `tca train`, including an option left at its default
    cfg = build_config(task="copy", seq_len=16, d_model=16, nhead=2, dim_ff=32, emb_depth=2, encoder="constant",
                       steps=1, batch_size=2, eval_size=4, eval_batch=4, eval_every=0, progress=False,
                       run_dir=str(tmp_path / "run"))
    Trainer(cfg).fit()
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    assert gym.make("TreeRetrieval-v0", predictor=ckpt).unwrapped.task.seq_len == 16
    with pytest.raises(ValueError, match=r"'seq_len': \(32, 16\)"):
        gym.make("TreeRetrieval-v0", predictor=ckpt, task_options={"seq_len": 32})
    with pytest.raises(ValueError, match="query_positions"):
        gym.make("TreeRetrieval-v0", predictor=ckpt, task_options={"query_positions": "own"})



def test_recall_id_fixes_the_size_its_predictor_was_trained_around():
    """The recall predictor trained on N in [8, 1,024]; its id is the fixed problem N = 512, 64 queries: one
    episode descends log2(512 / 2) = 8 levels (leaf buckets of 2 slots)."""
    env = gym.make("TreeRetrieval-Recall-v0")
    task = env.unwrapped.task
    assert (task.context_len, task.min_context_len, task.num_queries) == (512, None, 64)
    env.reset(seed=0)
    steps, done = 0, False
    while not done:
        _, _, term, trunc, _ = env.step(0)
        steps, done = steps + 1, term or trunc
    assert steps == 8


def test_gp_sizes_may_change_but_not_the_kernel():
    env = gym.make("TreeRetrieval-GP-v0", task_options={"num_context": 20, "num_target": 3})
    assert (env.unwrapped.task.num_context, env.unwrapped.task.num_target) == (20, 3)
    with pytest.raises(ValueError, match="kernel"):
        gym.make("TreeRetrieval-GP-v0", task_options={"kernel": "matern52"})
