"""From mapping results to durable outbox work and the answer's counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from service import metrics
from service.outbox import Store
from service.results import Accept, Reject, Result, Skip


@dataclass
class Summary:
    accepted: int = 0
    duplicate: int = 0
    skipped: int = 0
    rejected: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {
            "success": True,
            "accepted": self.accepted,
            "duplicate": self.duplicate,
            "skipped": self.skipped,
            "rejected": self.rejected,
        }


def record(store: Store, direction: str, results: Sequence[Result], now: float) -> Summary:
    """Write every accepted result to the outbox in one transaction.

    Raises StoreError when the outbox cannot be written, so that the caller
    answers 503 and nothing is acknowledged that was not stored.
    """
    accepts = [result for result in results if isinstance(result, Accept)]
    inserted = iter(store.enqueue(direction, accepts, now) if accepts else [])
    summary = Summary()
    for index, result in enumerate(results):
        if isinstance(result, Accept):
            if next(inserted):
                summary.accepted += 1
            else:
                summary.duplicate += 1
        elif isinstance(result, Skip):
            summary.skipped += 1
            metrics.SKIPPED.labels(direction, result.reason).inc()
        elif isinstance(result, Reject):
            summary.rejected.append({"index": index, "error": result.error})
            metrics.REJECTED.labels(direction, result.code).inc()
    metrics.RECEIVED.labels(direction).inc(len(results))
    # Nothing to add is not written: each increment takes a lock and, under
    # gunicorn, writes to a shared file.
    if summary.accepted:
        metrics.ACCEPTED.labels(direction).inc(summary.accepted)
    if summary.duplicate:
        metrics.DUPLICATE.labels(direction).inc(summary.duplicate)
    return summary
