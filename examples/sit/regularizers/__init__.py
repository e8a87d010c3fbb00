"""Representation regularisers trained beside the flow-matching loss (and ANM): Dispersive Loss."""
