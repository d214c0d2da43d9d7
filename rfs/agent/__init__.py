"""The ReAct agent: one rollout of the researcher around one training run → one trace row."""

from rfs.agent.client import ContextOverflow, Reply, ResearcherClient, ServerDown, ServerRejected
from rfs.agent.rollout import Executed, RolloutSpec, RunTraining, rollout

__all__ = ["ContextOverflow", "Executed", "Reply", "ResearcherClient", "RolloutSpec", "RunTraining", "ServerDown", "ServerRejected", "rollout"]
