"""What a mixture is searched for.

`ValidationObjective`: the loss on one or more sources' validation splits,
combined with weights (`objective.weights`, source -> weight; unset = every
source equally). This is RegMix's and FastMix's pre-training objective
(Pile-CC validation loss = weight 1 on one source).
"""
from __future__ import annotations

import torch

from fastmix.data import Corpus
from fastmix.errors import UserError
from fastmix.optimizer import validate_weights
from fastmix.sampling import eval_windows
from fastmix.train import evaluate_loss


class ValidationObjective:
    def __init__(self, corpus: Corpus, name: str = "val",
                 weights: dict[str, float] | None = None, max_tokens_per_source: int = 16384,
                 batch_size: int = 16):
        if weights:
            unknown = sorted(set(weights) - set(corpus.sources))
            if unknown:
                raise UserError(f"objective.weights names unknown source(s) {unknown}; "
                                f"available: {corpus.sources}.")
            total = sum(float(v) for v in weights.values())
            full = {s: float(weights.get(s, 0.0)) / (total or 1.0) for s in corpus.sources}
            self.weights = validate_weights(full, corpus.sources, "objective.weights")
        else:
            self.weights = {s: 1.0 / len(corpus.sources) for s in corpus.sources}
        self.corpus, self.name, self.batch_size = corpus, name, batch_size
        self.max_tokens = max_tokens_per_source
        self._windows: dict[int, dict[str, torch.Tensor]] = {}  # per context length

    def windows(self, context: int) -> dict[str, torch.Tensor]:
        """Fixed validation windows of each weighted source, built once per context."""
        if context not in self._windows:
            wins = {s: eval_windows(self.corpus.tokens[s]["val"], context, self.max_tokens)
                    for s, w in self.weights.items() if w > 0}
            for s, win in wins.items():
                if len(win) == 0:
                    raise UserError(f"objective: source '{s}' has too few validation tokens for one "
                                    f"window of {context + 1}; lower the context or add documents.")
            self._windows[context] = wins
        return self._windows[context]

    def loss(self, model, device, meter=None, precision: str = "bf16") -> float:
        wins = self.windows(model.config.max_position_embeddings)
        return sum(self.weights[s] * evaluate_loss(model, win, device, meter, self.batch_size, precision)
                   for s, win in wins.items())

    def describe(self) -> dict:
        return {"name": self.name, "weights": self.weights}
