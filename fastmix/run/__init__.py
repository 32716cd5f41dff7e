"""Running jobs: one job from config to result.json (`pipeline`), proxy runs
fanned out to processes or SLURM (`fanout`, `slurm`), a sweep's summary
(`sweep`) and a run exported for stock lm-eval (`export`)."""
