"""Search agents: the paper's attention policy with REINFORCE (:mod:`agents.attention`) and Stable-Baselines3 /
sb3-contrib algorithms on the environment (:mod:`agents.sb3`, ``make_agent``)."""

#: agents that co-train with the predictor through the environment (``agents.sb3.make_agent``'s names); kept
#: here, free of imports, so configuration code can offer them without loading Stable-Baselines3
AGENT_NAMES = ("reinforce", "random", "ppo", "a2c", "dqn", "maskable_ppo")
