"""Tree Cross Attention (ReTreever) as a reinforcement-learning environment."""

from .tasks import Batch, Task, make_task

__all__ = ["Batch", "Task", "make_task"]
