"""Tree Cross Attention (ReTreever) as a reinforcement-learning environment.

Importing the package registers ``TreeRetrieval-v0`` and ``tca_env/TreeRetrieval-v0`` with Gymnasium
(idempotently), so ``gym.make("tca_env:TreeRetrieval-v0")`` works in a fresh interpreter.
"""

from gymnasium.envs.registration import register, registry

from .tasks import Batch, Task, make_task

ENV_IDS = ("TreeRetrieval-v0", "tca_env/TreeRetrieval-v0")


def _register() -> None:
    for env_id in ENV_IDS:
        if env_id not in registry:  # re-imports and reloads must not re-register (Gymnasium warns)
            register(id=env_id, entry_point="tca_env.env:TreeRetrievalEnv",
                     vector_entry_point="tca_env.vector_env:make_vector_env")


_register()

__all__ = ["Batch", "Task", "make_task", "ENV_IDS"]
