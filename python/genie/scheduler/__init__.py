"""The scheduler: cost model, topology, placement policies with constraints, plans.

    topo = genie.NetworkTopology.from_file("cluster.toml")
    scheduler = genie.Scheduler(cost_estimator=genie.GraphCostEstimator(), network_topology=topo)
    schedule = scheduler.create_schedule(graph, profile)
    plan = genie.Planner().generate_plan(graph, profile, schedule)

Nothing here imports genie.semantic at import time; annotations are read from ``node.meta``
when present and derived structurally otherwise.
"""

from genie.scheduler.analysis import GraphAnalysis
from genie.scheduler.cost_model import FAMILIES, GraphCostEstimator, NodeCost, node_cost, op_family
from genie.scheduler.devices import DeviceSpec
from genie.scheduler.errors import (
    MemoryPlacementError,
    PlacementError,
    PlanValidationError,
    SchedulingError,
    TopologyError,
)
from genie.scheduler.optimizer import PASSES, AdaptiveOptimizer, SemanticOptimizer
from genie.scheduler.planner import ExecutionPlan, Fragment, Planner, Transfer
from genie.scheduler.policies import (
    STRATEGIES,
    AutoStrategy,
    DynamicStrategy,
    ParallelStrategy,
    PipelineStrategy,
    PriorityStrategy,
    SequentialStrategy,
    Strategy,
)
from genie.scheduler.schedule import ExecutionSchedule, Group, Stage
from genie.scheduler.scheduler import Scheduler
from genie.scheduler.topology import Device, Link, NetworkTopology, PathInfo

__all__ = [
    "FAMILIES",
    "PASSES",
    "STRATEGIES",
    "AdaptiveOptimizer",
    "AutoStrategy",
    "Device",
    "DeviceSpec",
    "DynamicStrategy",
    "ExecutionPlan",
    "ExecutionSchedule",
    "Fragment",
    "GraphAnalysis",
    "GraphCostEstimator",
    "Group",
    "Link",
    "MemoryPlacementError",
    "NetworkTopology",
    "NodeCost",
    "ParallelStrategy",
    "PathInfo",
    "PipelineStrategy",
    "PlacementError",
    "PlanValidationError",
    "Planner",
    "PriorityStrategy",
    "Scheduler",
    "SchedulingError",
    "SemanticOptimizer",
    "SequentialStrategy",
    "Stage",
    "Strategy",
    "TopologyError",
    "Transfer",
    "node_cost",
    "op_family",
]
