"""Scoring predictions with the competition's metric, the report, and the FiftyOne import."""
