"""Which source each training sequence comes from, and how much its loss counts.

Two ways to train on a mixture w (FastMix, Sec. 3, "sampling-weighting
equivalence"):
  * sample each sequence's source with probability w_k, every loss counts 1;
  * sample sources uniformly and weight each sequence's loss by w_k.
Both have the same expected gradient (up to the normaliser); the second makes
w differentiable, and is how FastMix and DoReMi train. One sampler does both:
`probs` chooses the source, `loss_weights` scales its loss.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fastmix.errors import UserError


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T+1] int64: inputs are [:, :-1], targets [:, 1:]
    source: torch.Tensor  # [B] int64 index into sampler.names
    weight: torch.Tensor  # [B] float32 loss weight of each row's source
    loss_mask: torch.Tensor | None = None  # [B, T] 1 where a target token counts (post-training)

    def rows(self, sl: slice) -> Batch:
        """Some rows of the batch (a data-parallel rank's share of the global micro-batch)."""
        return Batch(self.input_ids[sl], self.source[sl], self.weight[sl],
                     None if self.loss_mask is None else self.loss_mask[sl])


def _as_vector(names: list[str], values: dict[str, float] | None, what: str) -> np.ndarray:
    if values is None:
        return np.full(len(names), 1.0 / len(names))
    missing = set(names) ^ set(values)
    if missing:
        raise UserError(f"{what} must name exactly the sources {names}; mismatch: {sorted(missing)}.")
    return np.array([float(values[n]) for n in names])


class MixtureSampler:
    """Draws micro-batches of random `context+1`-token windows from each source's
    training tokens. State (the RNG) is checkpointed so a resumed run draws the
    same batches as an uninterrupted one."""

    def __init__(self, arrays: dict[str, np.ndarray], context: int, batch_size: int, seed: int,
                 probs: dict[str, float] | None = None, loss_weights: dict[str, float] | None = None,
                 masks: dict[str, np.ndarray | None] | None = None):
        self.names = list(arrays)
        self.arrays = [arrays[n] for n in self.names]
        # Loss masks of post-training (prompt/answer) sources: prompt tokens do not count.
        self.masks = [(masks or {}).get(n) for n in self.names]
        self.context, self.batch_size = context, batch_size
        for n, a in zip(self.names, self.arrays):
            if len(a) < context + 1:
                raise UserError(f"source '{n}' has {len(a)} training tokens, fewer than one "
                                f"sequence of context+1={context + 1}; add text or lower the context.")
        self.probs = _as_vector(self.names, probs, "sampling probabilities")
        self.loss_weights = _as_vector(self.names, loss_weights, "loss weights")
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def set_loss_weights(self, w: Mapping[str, float]) -> None:
        """New per-source loss weights, by source name: a hook and the sampler agree on
        the order because neither relies on one."""
        self.loss_weights = _as_vector(self.names, w, "loss weights")

    def weights_of(self, source: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.loss_weights[source.numpy()].astype(np.float32))

    def next_batch(self) -> Batch:
        src = self.rng.choice(len(self.names), size=self.batch_size, p=self.probs / self.probs.sum())
        rows = np.empty((self.batch_size, self.context + 1), dtype=np.int64)
        mask = np.ones((self.batch_size, self.context), dtype=np.float32) if any(
            m is not None for m in self.masks) else None
        for i, k in enumerate(src):
            start = self.rng.integers(0, len(self.arrays[k]) - self.context)
            rows[i] = self.arrays[k][start:start + self.context + 1]
            if self.masks[k] is not None:
                mask[i] = self.masks[k][start + 1:start + self.context + 1]  # mask of the targets
        source = torch.from_numpy(src.astype(np.int64))
        return Batch(torch.from_numpy(rows), source, self.weights_of(source),
                     None if mask is None else torch.from_numpy(mask))

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "loss_weights": self.loss_weights.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.loss_weights = np.array(state["loss_weights"])


def eval_windows(tokens: np.ndarray, context: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping `context+1` windows from the start of a held-out split, at
    most `max_tokens` targets: the same windows for every model, so losses compare."""
    n = min((len(tokens) - 1) // context, max(1, max_tokens // context))
    if n < 1:
        return torch.zeros((0, context + 1), dtype=torch.int64)
    idx = np.arange(n)[:, None] * context + np.arange(context + 1)[None, :]
    return torch.from_numpy(np.asarray(tokens[: n * context + 1])[idx].astype(np.int64))
