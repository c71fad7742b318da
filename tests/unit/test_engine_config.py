"""Pure parts of the engine: step planning, DeepSpeed config."""

from __future__ import annotations

from typing import Any

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.train.engine import DistEnv, deepspeed_config, plan_steps


def cfg(**over: Any) -> TrainerConfig:
    base: dict[str, Any] = {
        "task": "causal-lm",
        "model": {"source": "builtin:tiny-llama"},
        "data": {"train": "t.jsonl", "format": "text"},
        "job": {"name": "j"},
        "output": {"uri": "/tmp/x"},
    }
    base.update(over)
    return TrainerConfig.model_validate(base)


CPU = DistEnv(rank=0, world_size=1, local_rank=0, use_cuda=False)


def test_plan_steps_epochs_and_max_steps() -> None:
    c = cfg(hyperparameters={"perDeviceBatchSize": 4, "epochs": 2})
    assert plan_steps(c, 40, 1) == (10, 20)
    assert plan_steps(c, 40, 2) == (5, 10)
    c = cfg(hyperparameters={"perDeviceBatchSize": 4, "epochs": 2, "maxSteps": 7})
    assert plan_steps(c, 40, 1) == (10, 7)
    c = cfg(hyperparameters={"perDeviceBatchSize": 4, "gradientAccumulationSteps": 2})
    assert plan_steps(c, 40, 1)[0] == 5


def test_deepspeed_config_from_spec() -> None:
    conf = deepspeed_config(cfg(deepspeed={"zeroStage": 3, "offload": "cpu"}), CPU)
    assert conf["zero_optimization"]["stage"] == 3
    assert conf["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert conf["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert conf["bf16"] == {"enabled": False}  # CPU: fp32
    assert conf["zero_allow_untested_optimizer"] is True


def test_user_deepspeed_config_keeps_spec_batch_geometry() -> None:
    user = {"zero_optimization": {"stage": 1}, "train_batch_size": 999}
    c = cfg(deepspeed={"config": user}, hyperparameters={"perDeviceBatchSize": 2})
    conf = deepspeed_config(c, CPU)
    assert conf["zero_optimization"] == {"stage": 1}
    assert conf["train_micro_batch_size_per_gpu"] == 2
    assert "train_batch_size" not in conf
