"""fathompipe: the FathomNet 2025 winning classifier as a Slurm pipeline, from images to FiftyOne."""
__version__ = "0.1.0"
