"""Graphs: torch.fx tracing, roles of nodes (trunk, branches, births), linearization rules."""
from .roles import NonlinearTrunkError, TrunkPlan, plan_trunk
from .tracing import TracingError, trace_representation

__all__ = ["trace_representation", "plan_trunk", "TrunkPlan", "TracingError", "NonlinearTrunkError"]
