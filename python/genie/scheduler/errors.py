"""Errors the scheduler raises; all are ``genie.errors.GenieError`` subclasses."""

from __future__ import annotations

from genie.errors import GenieError, GraphValidationError

__all__ = [
    "SchedulingError",
    "TopologyError",
    "PlacementError",
    "MemoryPlacementError",
    "PlanValidationError",
]


class SchedulingError(GenieError):
    """The scheduler could not produce a schedule (the message says why)."""


class TopologyError(SchedulingError, ValueError):
    """A network topology is malformed: unknown device, missing link, bad figure."""


class PlacementError(SchedulingError):
    """A constraint cannot be met: a pin to an unknown device, conflicting co-location."""


class MemoryPlacementError(PlacementError):
    """The graph does not fit the devices' memory. ``details`` lists, per device that does
    not fit, the bytes needed at peak, the capacity and the largest tensors live at the peak."""

    def __init__(self, message: str, details: list[dict] | None = None):
        super().__init__(message)
        self.details = details or []


class PlanValidationError(GraphValidationError):
    """An execution plan is not self-consistent (cycle, input neither produced nor moved)."""
