"""The `somabrain` command with a timer around each step of the publisher's cycle.

`python -m bench.publisher_steps OUT.json publisher run --tenant T` runs the publisher
as `somabrain publisher run` does, and when it exits writes to OUT.json, per step, how
many times it ran and its duration in ms (mean, p50, p99, max, total): claim, Kafka
delivery (and, in exactly-once mode, the transaction's commit), marking rows sent,
saving the checkpoint position, waiting for a NOTIFY, and the whole cycle. Used by
`bench.latency --steps` to say where a cycle's time goes; the timers cost a few
microseconds per step.
"""

from __future__ import annotations

import atexit
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from somabrain.delivery import producer, publisher

_durations: defaultdict[str, list[float]] = defaultdict(list)
_batches: list[int] = []


def _timed(owner: Any, name: str, step: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _durations[step].append((time.perf_counter() - started) * 1000)

    setattr(owner, name, timed)


def _count_claims() -> None:
    original: Callable[..., list[Any]] = getattr(publisher, "claim_pending")  # noqa: B009

    def counted(*args: Any, **kwargs: Any) -> list[Any]:
        rows = original(*args, **kwargs)
        _batches.append(len(rows))
        return rows

    setattr(publisher, "claim_pending", counted)  # noqa: B010


def summary() -> dict[str, Any]:
    steps: dict[str, Any] = {}
    for step, values in _durations.items():
        ordered = sorted(values)
        steps[step] = {
            "count": len(ordered),
            "mean": round(sum(ordered) / len(ordered), 2),
            "p50": round(ordered[len(ordered) // 2], 2),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
            "max": round(ordered[-1], 2),
            "total": round(sum(ordered)),
        }
    claimed = [n for n in _batches if n]
    return {
        "unit": "ms",
        "steps": steps,
        "rows_per_claim_that_found_rows": {
            "count": len(claimed),
            "mean": round(sum(claimed) / len(claimed), 1) if claimed else 0,
            "max": max(claimed, default=0),
        },
        "empty_claims": len(_batches) - len(claimed),
    }


def main() -> None:
    out = Path(sys.argv[1])
    _count_claims()
    _timed(publisher, "claim_pending", "claim")
    _timed(publisher, "mark_sent", "mark_sent")
    _timed(publisher, "save_checkpoint_position", "save_checkpoint_position")
    _timed(publisher.Publisher, "drain_once", "cycle")
    _timed(publisher.Publisher, "_settle", "settle_in_database")
    _timed(publisher.Publisher, "_wait_for_notify", "wait_for_notify")
    _timed(producer.TransactionalDelivery, "deliver", "kafka_deliver")
    _timed(producer.TransactionalDelivery, "_commit", "kafka_commit_transaction")
    _timed(producer.IdempotentDelivery, "deliver", "kafka_deliver")
    atexit.register(lambda: out.write_text(json.dumps(summary(), indent=2) + "\n"))

    from somabrain.edges.cli import main as somabrain_main

    sys.argv = ["somabrain", *sys.argv[2:]]
    somabrain_main()


if __name__ == "__main__":
    main()
