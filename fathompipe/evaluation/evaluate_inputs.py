"""What the evaluate stage is given: plain, picklable, light to import (status reads them).

No API key is ever held here: a FiftyOne Enterprise deployment is a name, and its URI and key are
read inside the job (fathompipe/evaluation/fiftyone_env.py). A database password belongs in FIFTYONE_DATABASE_URI
in the environment or .env, not in `database_uri`, which travels in the job's pickle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class SplitInputs:
    split: str
    annotations: str
    predictions: str
    report_dir: str
    images_dir: str


@dataclass(frozen=True)
class FiftyOneTarget:
    """Where and how the stage writes in FiftyOne."""

    dataset: str = "fathomnet-2025"
    field: str = "model_predictions"
    eval_key: str = "eval_model"  # the evaluation of split S is stored as `<eval_key>_<S>`
    database_uri: Optional[str] = None
    deployment: Optional[str] = None
    env_file: Optional[str] = None
