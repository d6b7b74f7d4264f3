"""dvclive logs kept beside resumable checkpoints (``train``, the toy base): trimmed to the resumed step.

On resume, rows an interrupted run logged after its last checkpoint are dropped before dvclive
appends, so no step appears twice and a resumed run's logs equal an uninterrupted run's.
"""

from __future__ import annotations

import csv
from pathlib import Path

from regionroute.files import atomic_path

__all__ = ["trim_live_logs"]


def trim_live_logs(live_dir: Path, step: int) -> int:
    """Drop dvclive plot rows with ``step`` > ``step`` (``plots/metrics/**/*.tsv``); returns rows dropped."""
    dropped = 0
    for tsv in sorted((Path(live_dir) / "plots" / "metrics").rglob("*.tsv")):
        with tsv.open(newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
            fields = list(rows[0]) if rows else None
        keep = [r for r in rows if int(float(r["step"])) <= step]
        if len(keep) == len(rows) or fields is None:
            continue
        dropped += len(rows) - len(keep)
        with atomic_path(tsv) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(keep)
    return dropped
