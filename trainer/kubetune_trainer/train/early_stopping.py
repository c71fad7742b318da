"""Early stopping: stop once the watched validation metric has not improved for `patience`
evaluations in a row."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kubetune_trainer.config import EarlyStoppingSpec, lower_is_better

# Validation reports macro F1 as "f1"; the spec accepts both names.
_ALIASES = {"f1_macro": "f1"}


@dataclass
class EarlyStopping:
    """Best value so far and evaluations since; both travel in checkpoints (TrainState)."""

    metric: str
    patience: int
    min_delta: float = 0.0
    lower_is_better: bool = True
    best: float | None = None
    evals_without_improvement: int = 0

    @classmethod
    def from_spec(
        cls,
        spec: EarlyStoppingSpec,
        *,
        best: float | None = None,
        evals_without_improvement: int = 0,
    ) -> EarlyStopping:
        # The spec rejects a mode that contradicts the metric, so the metric decides.
        lower = lower_is_better(spec.metric)
        return cls(
            metric=spec.metric,
            patience=spec.patience,
            min_delta=spec.min_delta,
            lower_is_better=lower,
            best=best,
            evals_without_improvement=evals_without_improvement,
        )

    @property
    def should_stop(self) -> bool:
        return self.evals_without_improvement >= self.patience

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.lower_is_better:
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float) -> bool:
        """Record one evaluation; True when training should stop."""
        if self.improved(value):
            self.best, self.evals_without_improvement = value, 0
        else:
            self.evals_without_improvement += 1
        return self.should_stop

    def observe(self, metrics: Mapping[str, float]) -> bool:
        """`update` with the watched metric picked out of one validation's metrics."""
        value = metrics.get(_ALIASES.get(self.metric, self.metric))
        if value is None:
            raise ValueError(
                f"earlyStopping.metric {self.metric!r} is not computed for this task; "
                f"accepted: {', '.join(sorted(metrics))}"
            )
        return self.update(value)
