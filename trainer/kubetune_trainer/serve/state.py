"""Settings and shared mutable state of one inference server process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kubetune_trainer.evaluate.modelcard import ModelCard

if TYPE_CHECKING:  # the engine module pulls in torch; only its types are needed here
    from kubetune_trainer.serve.engines import Engine, MicroBatcher

Task = Literal["causal-lm", "sequence-classification"]

# Inference endpoints by the task that serves them; used for 404s and admission control.
TASK_ENDPOINTS: dict[str, Task] = {
    "/v1/chat/completions": "causal-lm",
    "/v1/completions": "causal-lm",
    "/v1/classify": "sequence-classification",
}


@dataclass(frozen=True)
class ServeSettings:
    model: str
    """Local model directory or s3:// URI."""
    model_name: str
    """Name the model is served under (OpenAI ``model`` field)."""
    host: str = "127.0.0.1"
    port: int = 8080
    max_concurrency: int = 64
    escalation_threshold: float | None = None
    """Overrides the model card's threshold when set."""
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 1024
    max_batch_size: int = 32
    batch_wait_ms: float = 2.0
    max_texts_per_request: int = 256
    max_prompts_per_request: int = 16
    """Each prompt is a full generation: the list is capped so one request cannot run for hours."""
    shutdown_delay_s: float = 0.0
    """After SIGTERM: seconds to keep serving (readiness already false) before stopping."""
    download_dir: Path | None = None
    device: str = "auto"
    """torch device for the model: auto (GPU when present), cpu, cuda, cuda:1, ..."""
    load_delay_s: float = 0.0
    """Testing aid: pause before loading, to observe readiness going from 503 to 200."""


@dataclass
class ServerState:
    settings: ServeSettings
    card: ModelCard | None = None
    model_dir: Path | None = None
    engine: Engine | None = None
    batcher: MicroBatcher | None = None
    load_error: str | None = None
    draining: bool = False
    in_flight: int = 0
    created: int = 0

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def threshold(self) -> float:
        if self.settings.escalation_threshold is not None:
            return self.settings.escalation_threshold
        return self.card.escalation_threshold if self.card is not None else 0.5
