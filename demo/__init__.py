"""The offline demo (`python -m demo` from the repository root); it lives with the repository because it
serves the shipped images through the stand-in server in support/."""
