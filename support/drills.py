"""The reliability table of the failure drills: printed after a pytest run of them and by bench/drills.py."""
from __future__ import annotations

from typing import Dict, List

DRILL_COLUMNS = ("drill", "fault", "outcome", "commands", "images_redone", "rois_redone", "data_lost")


def drill_table(records: List[Dict[str, object]]) -> List[str]:
    """The reliability table as markdown lines."""
    lines = ["| " + " | ".join(DRILL_COLUMNS) + " |", "|" + "---|" * len(DRILL_COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in DRILL_COLUMNS) + " |" for r in records]
    return lines
