"""FineTuneJob (kubetune.io/v1alpha1): spec and status models.

The CRD in crds/ and in the Helm chart is generated from these models by crdgen. The spec embeds
the trainer contract (TrainingSpec) and adds what only a cluster needs.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kubetune_trainer.config import TrainingSpec, WireModel, reject_inline_secrets

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]

# Children are named <job>-rank-<i> and <job>-serve; a pod hostname is at most 63 characters.
MAX_JOB_NAME = 52
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")

Phase = Literal[
    "Pending",
    "Queued",
    "Running",
    "Restarting",
    "Evaluating",
    "Deploying",
    "Succeeded",
    "Failed",
    "Suspended",
    "Cancelled",
]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed", "Cancelled"})


def _quantity(v: str, field: str) -> str:
    if not _QUANTITY.match(v):
        raise ValueError(
            f"{field} {v!r} is not a Kubernetes quantity; accepted forms like 4, 500m, 16Gi"
        )
    return v


# Upper bound of every duration field: an absurd value (beyond int64, say) is an error, not
# a job that never ends.
TEN_YEARS = 10 * 365 * 24 * 3600


class Toleration(WireModel):
    """A pod toleration, as in core/v1."""

    key: str | None = Field(default=None, description="Taint key to tolerate.", max_length=253)
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty tolerates all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, le=TEN_YEARS, description="How long a NoExecute taint is tolerated."
    )


class ResourcesSpec(WireModel):
    """Compute for the training ranks: one pod per node, GPUs per node."""

    nodes: int = Field(default=1, ge=1, le=512, description="Number of nodes (one rank pod each).")
    gpus_per_node: int = Field(
        default=1, ge=0, le=16, description="GPUs per node (nvidia.com/gpu); 0 trains on CPU."
    )
    cpu: str = Field(default="4", description="CPU request and limit per rank pod.")
    memory: str = Field(default="16Gi", description="Memory request and limit per rank pod.")
    image: str | None = Field(
        default=None,
        description="Trainer image. Default: the operator's configured trainer image.",
        max_length=512,
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the rank pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations for the rank pods.", max_length=64
    )
    priority_class_name: str | None = Field(
        default=None, description="PriorityClass of the rank pods.", max_length=253
    )

    @field_validator("cpu", "memory")
    @classmethod
    def _q(cls, v: str) -> str:
        return _quantity(v, "quantity")


class SecretRef(WireModel):
    """A reference to a Secret in the job's namespace holding S3 credentials."""

    name: str = Field(description="Secret name.", min_length=1, max_length=253)
    access_key_id_key: str = Field(
        default="AWS_ACCESS_KEY_ID", description="Key in the Secret holding the access key id."
    )
    secret_access_key_key: str = Field(
        default="AWS_SECRET_ACCESS_KEY",
        description="Key in the Secret holding the secret access key.",
    )


class StorageSpec(WireModel):
    """Object storage for checkpoints, progress, evaluation and the model."""

    bucket: str = Field(
        description="S3 bucket.",
        min_length=3,
        max_length=63,
        pattern=r"^[a-z0-9][a-z0-9.\-]+[a-z0-9]$",
    )
    prefix: str = Field(
        default="kubetune",
        description="Key prefix; the run lives under <prefix>/<namespace>/<job>/.",
        max_length=512,
        pattern=r"^[A-Za-z0-9._\-/]*$",
    )
    endpoint: str | None = Field(
        default=None,
        description="S3 endpoint URL for S3-compatible stores, e.g. http://minio:9000.",
        max_length=512,
        pattern=r"^https?://[^\s]+$",
    )
    region: str = Field(default="us-east-1", description="S3 region.", max_length=64)
    credentials_secret_ref: SecretRef | None = Field(
        default=None,
        description="Secret with the S3 keys. Default: the pod's ambient credentials (IRSA etc).",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        reject_inline_secrets(data, "")
        return data

    @field_validator("endpoint")
    @classmethod
    def _no_userinfo(cls, v: str | None) -> str | None:
        if v is not None and "@" in v:  # user:password@host (a raw secret may hold '/')
            raise ValueError(
                "credentials must never be written into the endpoint URL; put them in a Secret "
                "and reference it with credentialsSecretRef"
            )
        return v


class RunPolicy(WireModel):
    """Retries, deadlines and lifecycle."""

    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Gang restarts allowed on retryable failures."
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=TEN_YEARS,
        description="Fail the job (DeadlineExceeded) after this long running.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, le=TEN_YEARS, description="Delete the job this long after it finishes."
    )
    suspend: bool = Field(
        default=False,
        description="Stop the ranks and keep checkpoints; false again resumes from a checkpoint.",
    )
    cancel: bool = Field(
        default=False,
        description="Cancel: ranks get SIGTERM, save a final checkpoint; the job ends Cancelled.",
    )
    node_failure_toleration_seconds: int = Field(
        default=60,
        ge=0,
        le=3600,
        description=(
            "How long ranks stay bound to a NotReady or unreachable node before Kubernetes evicts"
            " them and the job restarts elsewhere (Kubernetes' own default is 300); a rank still"
            " Terminating on a lost node after this long is force-deleted."
        ),
    )
    queue_timeout_seconds: int | None = Field(
        default=None,
        ge=1,
        le=TEN_YEARS,
        description=(
            "How long the job may wait Queued (no capacity, quota exceeded) before it fails;"
            " unset: the operator's default (the chart's scheduling.queueTimeoutSeconds),"
            " unlimited when that is unset too."
        ),
    )
    gang_timeout_seconds: int = Field(
        default=120,
        ge=1,
        le=86400,
        description=(
            "If not every rank of an attempt is scheduled within this long, release the partial"
            " gang and requeue with back-off (not a failure; backoffLimit is untouched)."
        ),
    )
    checkpoint_grace_seconds: int = Field(
        default=300,
        ge=1,
        le=86400,
        description=(
            "The rank pods' termination grace period: time to save a checkpoint after SIGTERM"
            " (preemption, drain, suspend, cancel, budget)."
        ),
    )
    stall_timeout_seconds: int = Field(
        default=600,
        ge=0,
        le=86400,
        description=(
            "A rank that completes no optimizer step for this long (a hung rank, a stuck"
            " collective) ends its attempt as Stalled and the gang restarts from the newest"
            " checkpoint; 0 turns the watchdog off."
        ),
    )
    max_gpu_hours: float | None = Field(
        default=None,
        gt=0,
        le=1e7,
        description=(
            "GPU-hour budget over all attempts; when spent, the ranks checkpoint and stop and"
            " the job fails with BudgetExceeded."
        ),
    )


class InferenceResources(WireModel):
    """Compute for each inference replica."""

    cpu: str = Field(default="1", description="CPU per replica.")
    memory: str = Field(default="2Gi", description="Memory per replica.")
    gpus: int = Field(default=0, ge=0, le=16, description="GPUs per replica.")

    @field_validator("cpu", "memory")
    @classmethod
    def _q(cls, v: str) -> str:
        return _quantity(v, "quantity")


class InferenceSpec(WireModel):
    """Serve the tuned model once the evaluation gates pass."""

    enabled: bool = Field(default=False, description="Create <job>-serve when the gates pass.")
    replicas: int = Field(default=1, ge=0, le=100, description="Inference replicas.")
    resources: InferenceResources = Field(
        default_factory=InferenceResources, description="Per-replica compute."
    )
    port: int = Field(default=8080, ge=1, le=65535, description="Container and Service port.")
    escalation_threshold: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Classification: escalate when the top score is below this.",
    )
    keep_after_ttl: bool = Field(
        default=False,
        description="Keep the inference Deployment when ttlSecondsAfterFinished deletes the job.",
    )


class FineTuneJobSpec(TrainingSpec):
    """Desired state of a FineTuneJob."""

    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Compute for the training ranks."
    )
    storage: StorageSpec | None = Field(
        default=None,
        description="Object storage for the run. Required on a cluster; `kubetune run` "
        "writes to ./runs/<job>/ when absent.",
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Retries and lifecycle.")
    inference: InferenceSpec = Field(
        default_factory=InferenceSpec, description="Inference deployment after the gates pass."
    )

    @model_validator(mode="after")
    def _cross_field(self) -> FineTuneJobSpec:
        if self.method == "qlora" and self.resources.gpus_per_node == 0:
            raise ValueError(
                "resources.gpusPerNode: method 'qlora' needs GPUs; set gpusPerNode >= 1, "
                "or use method lora or full"
            )
        return self


class Condition(WireModel):
    """A standard Kubernetes condition."""

    type: str = Field(description="Condition type, e.g. Validated, Trained, Evaluated, Serving.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase machine-readable reason.")
    message: str = Field(default="", description="Human-readable details.")
    last_transition_time: str | None = Field(
        default=None, description="When the status last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, description="The spec generation this condition was computed for."
    )


class Progress(WireModel):
    """Training progress as last reported by rank 0."""

    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, description="Optimizer steps planned.")
    epoch: float = Field(default=0.0, description="Epochs done (fractional).")
    percent: int = Field(default=0, description="step / totalSteps, in percent.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds to finish.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput.")
    loss: float | None = Field(default=None, description="Latest training loss.")


class CheckpointRef(WireModel):
    """A checkpoint in the store."""

    step: int = Field(description="Step the checkpoint was saved at.")
    uri: str = Field(description="Where it lives.")
    time: str | None = Field(default=None, description="When it was saved (RFC 3339).")


class FailureInfo(WireModel):
    """The last rank failure."""

    # Unknown values are left out, never "": an empty string here has been seen stored as null
    # (and then rejected) by an API server, which blocked every later status update.
    pod: str | None = Field(default=None, description="Pod that failed.")
    node: str | None = Field(default=None, description="Node it ran on (absent if unknown).")
    exit_code: int | None = Field(default=None, description="Container exit code.")
    reason: str | None = Field(
        default=None, description="Classified reason, e.g. OOMKilled, InvalidData."
    )
    message: str | None = Field(default=None, description="Termination message.")


class PodUsage(WireModel):
    """One rank pod's share of the usage, as of the last update."""

    gpu_seconds: float = Field(default=0.0, description="GPUs x seconds this pod ran.")
    price: float | None = Field(default=None, description="Price per GPU-hour on its node.")
    gpus: int = Field(default=0, description="GPUs the pod holds.")
    running: bool = Field(default=False, description="It was running at the last update.")


class Usage(WireModel):
    """What the job has used so far, over every attempt (failed and interrupted ones too)."""

    gpu_seconds: float = Field(
        default=0.0, description="GPUs x seconds each rank pod ran, summed over all attempts."
    )
    gpu_hours: float = Field(default=0.0, description="gpuSeconds / 3600, rounded.")
    closed_gpu_seconds: float = Field(
        default=0.0, description="The part of gpuSeconds from rank pods that are gone."
    )
    closed_cost: float = Field(default=0.0, description="The part of the cost from pods gone.")
    open_pods: dict[str, PodUsage] = Field(
        default_factory=dict,
        description="Rank pods that still exist (uid -> their usage at the last update).",
    )
    wall_seconds: float = Field(default=0.0, description="Seconds since training first started.")
    attempts: int = Field(default=0, description="Gangs launched (every attempt counts).")
    interruptions: int = Field(default=0, description="Attempts Kubernetes took away.")
    estimated_cost: float | None = Field(
        default=None, description="GPU-hours x the configured price (absent when unpriced)."
    )
    currency: str | None = Field(default=None, description="Currency of estimatedCost.")
    updated: str | None = Field(default=None, description="When usage was last written.")


class FineTuneJobStatus(WireModel):
    """Observed state of a FineTuneJob. Owned by the operator."""

    phase: Phase = Field(
        default="Pending", description="Summary for people; decisions read conditions."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions.")
    observed_generation: int | None = Field(
        default=None, description="The spec generation the operator last acted on."
    )
    progress: Progress | None = Field(default=None, description="Training progress.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Latest metrics (train/eval, and final test metrics)."
    )
    eval_summary: str | None = Field(
        default=None, description="One-line evaluation summary for kubectl get."
    )
    checkpoints: list[CheckpointRef] = Field(
        default_factory=list, description="Checkpoints known to exist in the store."
    )
    restarts: int = Field(default=0, description="Gang restarts after failures so far.")
    interruptions: int = Field(
        default=0, description="Times Kubernetes took a rank away (preemption, eviction)."
    )
    gang_releases: int = Field(
        default=0, description="Partial gangs released after gangTimeoutSeconds."
    )
    usage: Usage | None = Field(default=None, description="GPU-seconds, attempts and cost.")
    last_failure: FailureInfo | None = Field(default=None, description="The last rank failure.")
    model_uri: str | None = Field(default=None, description="Where the final model is.")
    endpoint: str | None = Field(default=None, description="In-cluster URL of the inference API.")
    start_time: str | None = Field(default=None, description="When training first started.")
    completion_time: str | None = Field(default=None, description="When the job finished.")


class ObjectMeta(WireModel):
    """The parts of metadata that a FineTuneJob file must carry."""

    model_config = WireModel.model_config | {"extra": "allow"}

    name: str = Field(description="Job name (DNS-1123 label, at most 52 characters).")
    namespace: str | None = Field(default=None, description="Namespace.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > MAX_JOB_NAME or not _DNS1123.match(v):
            raise ValueError(
                f"must be a DNS-1123 label of at most {MAX_JOB_NAME} characters "
                "(lowercase letters, digits, '-'), so that <job>-rank-<i> is a valid hostname"
            )
        return v


class FineTuneJob(WireModel):
    """A fine-tuning job: data + base model in, evaluated (and optionally served) model out."""

    model_config = WireModel.model_config | {"extra": "ignore"}

    api_version: Literal["kubetune.io/v1alpha1"] = Field(description="kubetune.io/v1alpha1")
    kind: Literal["FineTuneJob"] = Field(description="FineTuneJob")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(description="Desired state.")
    status: FineTuneJobStatus | None = Field(default=None, description="Observed state.")
