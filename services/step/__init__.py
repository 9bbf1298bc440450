"""The scheduler <-> worker step contract: owned by neither side, imported by both (no torch)."""

from services.step.plan import SamplingOptions, ScheduledSeq, SeqStart, StepPlan, StepResult

__all__ = ["SamplingOptions", "ScheduledSeq", "SeqStart", "StepPlan", "StepResult"]
