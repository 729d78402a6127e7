"""Analysis: micro-benchmarks of blocks and attention (more to come: FLOPs, divergences, ablation tables)."""
