"""Side-by-side benchmarks: direct, through the connector, and through `ssh -N -R` (see run.py)."""
