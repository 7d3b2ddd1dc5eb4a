"""Coordination on top of DualMemory: CFN loop memory, agent lifecycle, blocking signals with
signed ACKs, and the resumable change Subscriber."""

from dualmem.coordination.lifecycle import AgentEvent, AgentInfo, AgentLifecycle, AgentStatus
from dualmem.coordination.loops import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_CONSENSUS_THRESHOLD,
    Decision,
    Loop2Consensus,
    Loop3Confidence,
    Loop4Decision,
    LoopMemory,
)
from dualmem.coordination.signals import Ack, AckResult, BlockingCoordinator, Signal
from dualmem.subscriber import Subscriber

__all__ = [
    "DEFAULT_CONFIDENCE_THRESHOLD",
    "DEFAULT_CONSENSUS_THRESHOLD",
    "Ack",
    "AckResult",
    "AgentEvent",
    "AgentInfo",
    "AgentLifecycle",
    "AgentStatus",
    "BlockingCoordinator",
    "Decision",
    "Loop2Consensus",
    "Loop3Confidence",
    "Loop4Decision",
    "LoopMemory",
    "Signal",
    "Subscriber",
]
