"""The two directions, by the names the outbox, the metrics and the CLI use."""

from __future__ import annotations

SEGMENT_TO_VERO = "segment_to_vero"
VERO_TO_SEGMENT = "vero_to_segment"
DIRECTIONS = (SEGMENT_TO_VERO, VERO_TO_SEGMENT)
