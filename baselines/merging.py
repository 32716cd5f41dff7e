"""Linear model merging for DeMix (`baselines.demix`): theta(w) = sum_k w_k theta_k,
mergekit's `linear` method without a base model, as Lucius-lsr/DeMix's
model_merge/generate_merge_yaml.py configures it. `merge_into` writes the merge
in place into one model, so scoring a candidate allocates nothing."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fastmix.errors import UserError


def check_merge_weights(weights, n: int, atol: float = 1e-6) -> np.ndarray:
    """Merge weights as a float64 vector: n of them, finite, >= 0, summing to 1."""
    w = np.asarray([float(v) for v in weights], dtype=np.float64)
    if len(w) != n:
        raise UserError(f"merge: {len(w)} weights for {n} models; give one weight per model.")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise UserError(f"merge weights must be finite and >= 0; got {w.tolist()}.")
    if abs(w.sum() - 1.0) > atol:
        raise UserError(f"merge weights sum to {w.sum():.6g}, not 1: theta(w) = sum_k w_k theta_k is a "
                        f"weighted average; rescale them (divide each by {w.sum():.6g}).")
    return w


def _states(models) -> list[Mapping[str, torch.Tensor]]:
    states = [m.state_dict() if isinstance(m, torch.nn.Module) else m for m in models]
    if not states:
        raise UserError("merge: no models given.")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise UserError(f"merge: model {i} does not have model 0's parameters (names and shapes); "
                            "components must share one architecture.")
    return states


def _accumulate(tensors: Sequence[torch.Tensor], w: np.ndarray, out: torch.Tensor) -> None:
    """out = sum_k w_k t_k over the nonzero weights (a weight of 1 copies exactly)."""
    if not out.is_floating_point():  # integer buffers cannot be averaged: they must agree
        if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise UserError("merge: models differ in a non-float buffer; they cannot be averaged.")
        out.copy_(tensors[0])
        return
    nz = [k for k in range(len(w)) if w[k] > 0]
    out.copy_(tensors[nz[0]])
    if w[nz[0]] != 1.0:
        out.mul_(float(w[nz[0]]))
    for k in nz[1:]:
        out.add_(tensors[k].mul(float(w[k])))


def merge(models_or_state_dicts: Sequence, weights) -> dict[str, torch.Tensor]:
    """Linear merge theta(w) = sum_k w_k theta_k (mergekit `linear`, as the public code) as a
    new state dict. Weights must be >= 0 and sum to 1 (UserError otherwise)."""
    states = _states(models_or_state_dicts)
    w = check_merge_weights(weights, len(states))
    out = {}
    for name, t in states[0].items():
        out[name] = torch.empty_like(t)
        _accumulate([s[name] for s in states], w, out[name])
    return out


@torch.no_grad()
def merge_into(model: torch.nn.Module, states: Sequence[Mapping[str, torch.Tensor]], weights) -> None:
    """`merge`, written in place into `model`'s parameters and buffers (one model reused
    for every candidate: no allocation, nothing on disk)."""
    w = check_merge_weights(weights, len(states))
    for name, t in model.state_dict().items():  # tensors that share the model's storage
        _accumulate([s[name] for s in states], w, t)
