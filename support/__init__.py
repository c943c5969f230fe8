"""Scaffolding shared by tests/, bench/ and the demo: the stand-in FathomNet server, synthetic data, a
private mongod, the reference preprocessing recipe and the drill table. Not installed with fathompipe:
tests find it through pytest's `pythonpath`, bench scripts and `python -m demo` through the repository root."""
