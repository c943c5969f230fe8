"""The reliability table of the failure drills: printed after a pytest run of them and by bench/drills.py."""
from __future__ import annotations

from typing import Dict, List

DRILL_COLUMNS = ("drill", "fault", "outcome", "commands", "images_redone", "rois_redone", "data_lost")
MEASURES = ("images_redone", "rois_redone", "data_lost")
NOT_MEASURED = "n/a"  # a measure the drill's fault cannot affect (e.g. ROIs redone before inference could start)


def recovered_cleanly(record: Dict[str, object]) -> bool:
    """Nothing redone and nothing lost, by every measure the drill takes."""
    return all(record.get(k) in (0, NOT_MEASURED) for k in MEASURES) and any(record.get(k) == 0 for k in MEASURES)


def drill_table(records: List[Dict[str, object]]) -> List[str]:
    """The reliability table as markdown lines."""
    lines = ["| " + " | ".join(DRILL_COLUMNS) + " |", "|" + "---|" * len(DRILL_COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in DRILL_COLUMNS) + " |" for r in records]
    return lines
