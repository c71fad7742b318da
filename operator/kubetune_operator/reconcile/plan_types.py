"""What goes into the reconcile plan and what comes out of it: plain data, no I/O.

In: `Children` (what the executor found: rank pods, the inference Deployment, the credentials
Secret's key names, rank 0's metrics) and `Settings`. Out: `Plan` (the new status, events,
actions in the order to perform them, metric observations, when to look again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from kubetune_operator.api.models import KIND, FineTuneJobStatus
from kubetune_operator.reconcile.scheduling import NodeInfo
from kubetune_operator.reconcile.usage import Pricing
from kubetune_operator.status import Scrape

Obj = dict[str, Any]

# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Settings:
    """What the executor reads from the environment for each pass."""

    image: str  # the trainer image when spec.resources.image is unset
    restart_backoff: float = 10.0  # base of the gang-restart back-off, seconds
    # How long a job may wait Queued when its spec does not say (None: forever).
    queue_timeout: float | None = None
    pricing: Pricing = field(default_factory=Pricing)


@dataclass(frozen=True)
class SecretRead:
    """The key names (never values) of the credentials Secret, as the executor found them."""

    name: str
    keys: frozenset[str] | None  # None: the operator may not read Secrets (the pods will tell)
    found: bool = True


@dataclass(frozen=True)
class Sample:
    """What rank 0's metrics endpoint said, and the step rate since the attempt's first sample."""

    scrape: Scrape
    rate: float | None = None


@dataclass(frozen=True)
class Rejection:
    """The API server refused a rank pod (HTTP 422): its answer, and the ranks created before."""

    body: str
    created: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuotaRefusal:
    """A ResourceQuota refused a rank pod (HTTP 403): its answer, and the ranks created before."""

    body: str
    created: tuple[str, ...] = ()


@dataclass(frozen=True)
class Children:
    """A snapshot of what exists for one job, read by the executor before it plans."""

    rank_pods: list[Obj] = field(default_factory=list)
    deployment: Obj | None = None
    secret: SecretRead | None = None
    metrics: Sample | None = None
    rejection: Rejection | None = None  # set when the executor re-plans after a 422
    quota: QuotaRefusal | None = None  # set when the executor re-plans after a quota 403
    # The cluster's nodes, read only when a rank waits for capacity, is being deleted, or
    # prices depend on node labels (None: not read this pass).
    nodes: dict[str, NodeInfo] | None = None
    # (reason, message) of the Events on rank pods being taken away (who did it).
    pod_events: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Needs:
    """What the executor should read before planning (so a pass reads no more than it uses)."""

    rank_pods: bool = False
    deployment: bool = False
    secret: str | None = None  # the Secret's name, when its keys must be checked
    launched: bool = False  # a gang runs: rank pods taken away need explaining


# --------------------------------------------------------------------------- outputs


class Event(NamedTuple):
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Apply:
    """Create the object, or merge-patch it when it exists (pods are left as they are)."""

    manifest: Obj
    verb: ClassVar[str] = "apply"

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])


@dataclass(frozen=True)
class Delete:
    """Delete an object; gone already is fine. grace None: the object's own grace period."""

    kind: str
    name: str
    grace: int | None = None
    verb: ClassVar[str] = "delete"


@dataclass(frozen=True)
class Annotate:
    """Merge these annotations into the job (None removes one)."""

    name: str
    annotations: dict[str, str | None]
    kind: ClassVar[str] = KIND
    verb: ClassVar[str] = "annotate"


@dataclass(frozen=True)
class Orphan:
    """Drop an object's ownerReferences, if it exists, so the garbage collector keeps it."""

    kind: str
    name: str
    verb: ClassVar[str] = "orphan"


Action = Apply | Delete | Annotate | Orphan


@dataclass(frozen=True)
class GangRestarted:
    namespace: str


@dataclass(frozen=True)
class GateResult:
    passed: bool


@dataclass(frozen=True)
class RankRunning:
    """A rank of the job runs; seconds since the job was created when this is the first gang."""

    seconds: float | None


@dataclass(frozen=True)
class UsageSample:
    """The job's GPU-seconds as of this pass (exported as a counter)."""

    namespace: str
    name: str
    gpu_seconds: float


Observation = GangRestarted | GateResult | RankRunning | UsageSample


@dataclass(frozen=True)
class ScrapeTarget:
    """Rank 0's metrics endpoint for the current attempt: progress can be read there."""

    url: str
    attempt: str


@dataclass
class Plan:
    status: FineTuneJobStatus
    events: list[Event] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    requeue: float | None = None
    observations: list[Observation] = field(default_factory=list)
    scrape: ScrapeTarget | None = None
    # The spec is invalid and the status says so: the handlers give up (kopf PermanentError).
    invalid_spec: bool = False
