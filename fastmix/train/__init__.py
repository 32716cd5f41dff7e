"""The one training loop every proxy and target goes through (`loop`), the
mixture sampler that feeds it, the models it builds, the fused loss, the
DDP helpers and the cost meter that every method pays through."""
