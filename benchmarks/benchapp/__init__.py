"""Models the benchmarks write to: one per declaration style, one without."""
