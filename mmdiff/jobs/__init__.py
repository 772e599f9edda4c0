"""Jobs that drive a system from outside systems/: the benchmark and the precompute job."""
