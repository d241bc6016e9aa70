"""Tree Cross Attention (ReTreever) as a reinforcement-learning environment.

Importing the package registers ``TreeRetrieval-v0`` and ``tca_env/TreeRetrieval-v0`` with Gymnasium
(idempotently), so ``gym.make("tca_env:TreeRetrieval-v0")`` works in a fresh interpreter, and the
benchmark ids of :data:`BENCHMARK_IDS` (a fixed task and a shipped trained predictor each).
"""

from gymnasium.envs.registration import register, registry

from . import pretrained as _pretrained
from .tasks import Batch, Task, make_task

ENV_IDS = ("TreeRetrieval-v0", "tca_env/TreeRetrieval-v0")


#: benchmark ids: a fixed task with a shipped trained predictor (tca_env.pretrained)
BENCHMARK_IDS = _pretrained.ENV_IDS


#: the shipped predictor ``TreeRetrieval-v0`` starts from (``predictor="fresh"`` for a new one)
DEFAULT_PREDICTOR = "pretrained:copy-easy"


def _register() -> None:
    ids = [(env_id, {"predictor": DEFAULT_PREDICTOR}) for env_id in ENV_IDS]
    ids += [(env_id, {"predictor": f"pretrained:{name}",
                      **({"task_options": opts} if (opts := _pretrained.ENV_TASK_OPTIONS.get(env_id)) else {})})
            for env_id, name in BENCHMARK_IDS.items()]
    for env_id, kwargs in ids:
        if env_id not in registry:  # re-imports and reloads must not re-register (Gymnasium warns)
            register(id=env_id, entry_point="tca_env.env:TreeRetrievalEnv",
                     vector_entry_point="tca_env.vector_env:make_vector_env", kwargs=kwargs)


_register()


def evaluate(*args, **kwargs):
    """The one evaluation protocol (:func:`tca_env.evaluation.evaluate`): a policy's mean leaf reward with a
    95% interval over fixed-seed episodes of an env id."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["Batch", "Task", "make_task", "evaluate", "ENV_IDS", "BENCHMARK_IDS"]
