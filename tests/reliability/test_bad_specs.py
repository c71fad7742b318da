"""Bad FineTuneJobs, generated from the CRD schema with hypothesis, against the real control plane.

Each case starts from a valid tiny-llama chat job (``chat_job`` with the canary S3 Secret) and
breaks it in one way: a wrong JSON type, a number out of range, a value outside an enum, a
required field removed, an absurd size, a wrong format (patterns, quantities, URIs, names), a
cross-field combination the models or the cluster refuse, or a secret written inline where a
``credentialsSecretRef`` belongs. The schema walk (``LEAVES``) picks the field, hypothesis picks
the value (``derandomize=True``, no database: the same cases every run).

Every case goes to the API server the way ``kubectl apply`` sends a new object (a POST carrying
the ``last-applied-configuration`` annotation; the inline-secret cases through the real kubectl,
whose own schema check refuses some before anything is sent), all of them first, then the test
waits for every created job at once. A case counts as rejected when

- kubectl or the API server refuses it (400/422) with a message naming the field, or
- the job ends ``Failed`` (the operator running) with a condition message naming the field.

Jobs asking for more GPUs per node than any node has fail at once; the operator runs with a
default queue timeout of 3 s (``KUBETUNE_QUEUE_TIMEOUT_SECONDS``, the chart's
``scheduling.queueTimeoutSeconds``), so that jobs asking for more CPU or memory than a node has,
or a node selector nothing matches, fail in seconds instead of waiting Queued.

Anything else is unhandled: accepted and not Failed, Failed without naming the field, a
traceback in the operator log about it, or an inline secret that shows up in the job's status,
its Events or the operator log. Jobs still non-terminal at the deadline are stuck.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.cluster.controlplane import ControlPlane
from tests.e2e.conftest import CRD, SECRET, Operator, chat_job
from tests.reliability.record import record

pytestmark = pytest.mark.cluster

SCHEMA: dict[str, Any] = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"][
    "openAPIV3Schema"
]
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
TERMINAL = {"Succeeded", "Failed", "Cancelled"}
# Replaced, per case, by a unique marker that must not spread beyond the job's own spec.
INLINE = "<inline-secret>"
# Seconds a job may wait Queued before the operator fails it (default: unlimited).
QUEUE_TIMEOUT = 3
WAIT_TIMEOUT = 150
# These go through the real kubectl (a process each); the rest as the POST kubectl sends.
VIA_KUBECTL = {"inline_secret"}
SETTLE = 11  # the operator's timer runs every 5 s
# The fake nodes (tests/cluster/nodeagent.py): 64 CPUs, 512Gi, 8 GPUs each.
NODE_CPUS, NODE_MEMORY_GI, NODE_GPUS = 64, 512, 8
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
GATE = {"metric": "loss", "op": "<", "value": 100.0}
TOLERATION = {"key": "kubetune.io/test", "operator": "Exists", "effect": "NoSchedule"}
# A valid item for each array of objects, so a path can go through index 0.
ITEMS: dict[tuple[str, ...], Any] = {
    ("spec", "evaluation", "gates"): GATE,
    ("spec", "resources", "tolerations"): TOLERATION,
}

FieldPath = tuple[str | int, ...]
Op = tuple[str, FieldPath, Any]  # ("set", path, value) | ("del", path, None)


def wire(path: FieldPath) -> str:
    """("spec", "evaluation", "gates", 0, "op") -> "spec.evaluation.gates[0].op"."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def names_field(message: str, names: tuple[str, ...]) -> bool:
    """The message names one of ``names`` (list indices ignored: the API server drops them)."""
    msg = re.sub(r"\[\d+\]", "", message)
    for name in names:
        bare = re.escape(re.sub(r"\[\d+\]", "", name))
        if re.search(rf"(?<![\w.]){bare}(?![\w.])", msg):
            return True
    return False


# --------------------------------------------------------------------------- the schema walk


def walk(schema: dict[str, Any], path: FieldPath) -> list[tuple[FieldPath, dict[str, Any]]]:
    """Every field under ``schema`` (objects, arrays and their index-0 item, map values)."""
    out = [(path, schema)]
    if schema.get("type") == "object":
        for key, sub in (schema.get("properties") or {}).items():
            out += walk(sub, (*path, key))
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            out += walk(extra, (*path, "disk"))
    elif schema.get("type") == "array":
        out += walk(schema["items"], (*path, 0))
    return out


LEAVES = walk(SCHEMA["properties"]["spec"], ("spec",))


def required_paths() -> list[FieldPath]:
    out: list[FieldPath] = [("spec",)]
    for path, schema in LEAVES:
        out += [(*path, key) for key in schema.get("required") or []]
    return out


def leaves(pred: Callable[[dict[str, Any]], bool]) -> list[tuple[FieldPath, dict[str, Any]]]:
    return [(p, s) for p, s in LEAVES if pred(s)]


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    kind: str
    ops: tuple[Op, ...]
    names: tuple[str, ...]  # the message must name one of these (wire paths)
    cluster_only: bool = False  # only the cluster can tell (Secret, capacity, pod validation)

    @property
    def key(self) -> str:
        return json.dumps([self.kind, [list(o) for o in self.ops]], sort_keys=True, default=str)

    @property
    def secret(self) -> bool:
        return INLINE in self.key

    def describe(self) -> str:
        parts = []
        for verb, path, value in self.ops:
            if verb == "del":
                parts.append(f"-{wire(path)}")
            else:
                text = json.dumps(value)
                parts.append(f"{wire(path)}={text if len(text) < 60 else text[:57] + '...'}")
        return ", ".join(parts)


def case(kind: str, *ops: Op, names: tuple[str, ...] | None = None, cluster: bool = False) -> Case:
    return Case(kind, tuple(ops), names or (wire(ops[-1][1]),), cluster)


def put(path: FieldPath, value: Any) -> Op:
    return ("set", path, value)


def drop(path: FieldPath) -> Op:
    return ("del", path, None)


def _container(doc: Any, path: FieldPath) -> Any:
    """The parent of ``path``, creating objects and index-0 items on the way."""
    cur = doc
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(part, int):
            cur = cur[part]
            continue
        if not isinstance(cur.get(part), (dict, list)):
            if isinstance(nxt, int):
                key = tuple(p for p in path[: i + 1] if isinstance(p, str))
                cur[part] = [copy.deepcopy(ITEMS.get(key, "x"))]
            else:
                cur[part] = {}
        cur = cur[part]
    return cur


def _fill(value: Any, marker: str) -> Any:
    if isinstance(value, str):
        return value.replace(INLINE, marker)
    if isinstance(value, list):
        return [_fill(v, marker) for v in value]
    if isinstance(value, dict):
        return {k.replace(INLINE, marker): _fill(v, marker) for k, v in value.items()}
    return value


def build(base: dict[str, Any], c: Case, name: str, namespace: str, marker: str) -> dict[str, Any]:
    """The object `kubectl apply` would send for ``base`` broken by ``c``."""
    doc = copy.deepcopy(base)
    doc["metadata"] = {"name": name, "namespace": namespace}
    for verb, path, value in c.ops:
        parent = _container(doc, path)
        if verb == "del":
            parent.pop(path[-1], None)
        elif isinstance(parent, list):
            parent[path[-1]] = _fill(value, marker)  # type: ignore[index]
        else:
            parent[path[-1]] = _fill(value, marker)
    applied = json.dumps(doc, separators=(",", ":"))
    doc["metadata"].setdefault("annotations", {})[LAST_APPLIED] = applied
    return doc


# --------------------------------------------------------------------------- strategies

JSON_TYPES: dict[str, st.SearchStrategy[Any]] = {
    "string": st.text(max_size=12),
    "integer": st.integers(-1000, 10**6),
    # Non-integral: the API server takes 3.0 for an integer.
    "number": st.floats(-1e6, 1e6).filter(lambda x: not float(x).is_integer()),
    "boolean": st.booleans(),
    "array": st.lists(st.integers(0, 9), max_size=3),
    "object": st.dictionaries(st.sampled_from(["a", "b", "x"]), st.integers(0, 9), max_size=2),
}


def wrong_type(leaf: tuple[FieldPath, dict[str, Any]]) -> st.SearchStrategy[Case]:
    path, schema = leaf
    mine = schema.get("type")
    others = [v for t, v in JSON_TYPES.items() if t != mine and (mine, t) != ("number", "integer")]
    if not schema.get("nullable"):
        others.append(st.none())
    return st.one_of(others).map(lambda v: case("wrong_type", put(path, v)))


def out_of_range(leaf: tuple[FieldPath, dict[str, Any]]) -> st.SearchStrategy[Case]:
    path, s = leaf
    values: list[st.SearchStrategy[Any]] = []
    if s.get("type") == "integer":
        if "minimum" in s:
            values.append(st.integers(s["minimum"] - 10**6, s["minimum"] - 1))
        if "maximum" in s:
            values.append(st.integers(s["maximum"] + 1, s["maximum"] + 10**6))
    elif s.get("type") == "number":
        if "minimum" in s:
            lo = s["minimum"]
            values.append(st.floats(lo - 1e6, lo, exclude_max=not s.get("exclusiveMinimum")))
        if "maximum" in s:
            hi = s["maximum"]
            values.append(st.floats(hi, hi + 1e6, exclude_min=not s.get("exclusiveMaximum")))
    elif s.get("type") == "string" and s.get("minLength", 0) > 0:
        values.append(st.text(alphabet="ab", max_size=s["minLength"] - 1))
    elif s.get("type") == "array" and s.get("minItems", 0) > 0:
        values.append(st.just([]))
    return st.one_of(values).map(lambda v: case("out_of_range", put(path, v)))


def has_range(s: dict[str, Any]) -> bool:
    numeric = s.get("type") in ("integer", "number") and ("minimum" in s or "maximum" in s)
    return numeric or s.get("minLength", 0) > 0 or s.get("minItems", 0) > 0


def bad_enum(leaf: tuple[FieldPath, dict[str, Any]]) -> st.SearchStrategy[Case]:
    path, s = leaf
    enum = s["enum"]
    values: st.SearchStrategy[Any]
    if s.get("type") == "integer":
        values = st.integers(-(10**6), 10**6)
    else:
        near = st.sampled_from(enum).flatmap(
            lambda e: st.sampled_from(
                [e.upper(), e.title(), f" {e}", f"{e} ", e.replace("-", "_"), e + "s", e[:-1]]
            )
        )
        values = st.one_of(near, st.text(max_size=15))
    return values.filter(lambda v: v not in enum).map(lambda v: case("bad_enum", put(path, v)))


def absurd(leaf: tuple[FieldPath, dict[str, Any]]) -> st.SearchStrategy[Case]:
    path, s = leaf
    values: list[st.SearchStrategy[Any]] = []
    if "maxLength" in s:
        hi = s["maxLength"]
        values.append(
            st.tuples(st.sampled_from("xZ9-/"), st.integers(hi + 1, 2 * hi + 100)).map(
                lambda t: t[0] * t[1]
            )
        )
    if "maxItems" in s:
        hi = s["maxItems"]
        item = ITEMS.get(tuple(p for p in path if isinstance(p, str)))
        values.append(
            st.integers(hi + 1, hi + 64).map(
                lambda n: [copy.deepcopy(item) if item else f"t{i}" for i in range(n)]
            )
        )
    if s.get("type") == "integer":  # past int64: the API server sees a float
        values.append(st.integers(19, 60).flatmap(lambda k: st.sampled_from([10**k, -(10**k)])))
    if s.get("type") == "number" and "maximum" in s:
        values.append(st.floats(1e10, 1e300))
    return st.one_of(values).map(lambda v: case("absurd_size", put(path, v)))


def can_be_absurd(s: dict[str, Any]) -> bool:
    return (
        "maxLength" in s
        or "maxItems" in s
        or s.get("type") == "integer"
        or (s.get("type") == "number" and "maximum" in s)
    )


def not_matching(pattern: str) -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=20), st.text(alphabet="AZ_ !:a-.", max_size=8)).filter(
        lambda v: re.fullmatch(pattern, v) is None
    )


R = ("spec", "resources")
D = ("spec", "data")
S = ("spec", "storage")
REF = (*S, "credentialsSecretRef")
CLS = (put(("spec", "task"), "sequence-classification"), put((*D, "format"), "classification"))
BUCKETISH = st.from_regex(r"[a-z0-9][a-z0-9.\-]{1,10}[a-z0-9]", fullmatch=True)
KEY = st.from_regex(r"[a-z0-9_/]{1,16}\.jsonl", fullmatch=True)


def _pattern_case(path: FieldPath, pattern: str) -> st.SearchStrategy[Case]:
    return not_matching(pattern).map(lambda v: case("bad_format", put(path, v)))


def bad_formats() -> st.SearchStrategy[Case]:
    schema_patterns = [_pattern_case(p, s["pattern"]) for p, s in leaves(lambda s: "pattern" in s)]
    quantity = st.one_of(
        st.sampled_from(["1.5.0", "-1", "1e3", "4 cores", "16GB", "0x10", "+1", "1m1", "", "2gi"]),
        st.text(max_size=10),
    ).filter(lambda v: QUANTITY.match(v) is None)
    quantity_paths = [(*R, "cpu"), (*R, "memory"), ("spec", "inference", "resources", "cpu")]
    quantity_paths.append(("spec", "inference", "resources", "memory"))
    quantities = st.tuples(st.sampled_from(quantity_paths), quantity).map(
        lambda t: case("bad_format", put(t[0], t[1]))
    )
    data_uri = st.one_of(
        st.tuples(
            st.sampled_from(["gs", "http", "https", "ftp", "hf", "file", "S3"]), BUCKETISH, KEY
        ).map(lambda t: f"{t[0]}://{t[1]}/{t[2]}"),
        st.tuples(st.from_regex(r"[A-Z_]{1,3}[a-z_A-Z]{0,8}", fullmatch=True), KEY).map(
            lambda t: f"s3://{t[0]}/{t[1]}"
        ),
        st.sampled_from(["s3://", "s3:///train.jsonl", "s3:/b/k.jsonl", "s3://a/k", " s3://bkt/k"]),
        KEY.map(lambda k: f"/data/{k}"),  # a local path: not there in the pods
        KEY,
    )
    data_uris = st.tuples(st.sampled_from(["train", "validation", "test"]), data_uri).map(
        lambda t: case("bad_format", put((*D, t[0]), t[1]))
    )
    model_uri = st.one_of(
        st.tuples(st.sampled_from(["gs", "http", "ftp", "file"]), BUCKETISH).map(
            lambda t: f"{t[0]}://{t[1]}/model"
        ),
        st.from_regex(r"[A-Z_][a-zA-Z_]{0,10}", fullmatch=True).map(lambda n: f"builtin:{n}"),
        st.sampled_from(["hf://only-org", "hf://", "s3://UPPER/model", "builtin:"]),
        st.from_regex(r"/models/[a-z]{1,10}", fullmatch=True),
    )
    model_uris = st.tuples(st.sampled_from(["source", "tokenizer"]), model_uri).map(
        lambda t: case("bad_format", put(("spec", "model", t[0]), t[1]))
    )
    # Fine as a Kubernetes object name (DNS subdomain), not as a job name (a DNS label).
    dotted = st.from_regex(r"[a-z]{1,8}\.[a-z]{1,8}", fullmatch=True).map(
        lambda n: case("bad_format", put(("metadata", "name"), n))
    )
    # Not even an object name: the API server refuses it.
    upper = st.from_regex(r"[A-Z][a-z_]{1,10}", fullmatch=True).map(
        lambda n: case("bad_format", put(("metadata", "name"), n))
    )
    return st.one_of(*schema_patterns, quantities, data_uris, model_uris, dotted, upper)


def cross_field() -> st.SearchStrategy[Case]:
    m, h = ("spec", "method"), ("spec", "model")
    fmt = (*D, "format")
    labels = st.lists(st.from_regex(r"[a-z]{1,6}", fullmatch=True), min_size=2, max_size=5)
    return st.one_of(
        st.just(case("cross_field", put(m, "qlora"), put((*R, "gpusPerNode"), 0))),
        st.sampled_from(["chat", "instruction", "text"]).map(
            lambda f: case(
                "cross_field", put(("spec", "task"), "sequence-classification"), put(fmt, f)
            )
        ),
        st.just(case("cross_field", put(fmt, "classification"))),
        st.just(case("cross_field", *CLS, put((*D, "overlong"), "chunk"))),
        st.just(case("cross_field", *CLS, put((*D, "packing"), True))),
        st.integers(8, 4096).flatmap(
            lambda n: st.integers(n, 65536).map(
                lambda s: case(
                    "cross_field", put((*h, "maxSeqLength"), n), put((*D, "chunkStride"), s)
                )
            )
        ),
        labels.filter(lambda v: len(set(v)) == len(v)).map(
            lambda v: case("cross_field", put((*D, "labels"), v))
        ),
        labels.filter(lambda v: len(set(v)) < len(v)).map(
            lambda v: case("cross_field", *CLS, put((*D, "labels"), v))
        ),
        st.from_regex(r"[a-z]{1,6}", fullmatch=True).map(
            lambda v: case("cross_field", *CLS, put((*D, "labels"), [v]))
        ),
        st.tuples(st.floats(0.4, 0.5), st.floats(0.4, 0.5))
        .filter(lambda t: t[0] + t[1] >= 0.9)
        .map(
            lambda t: case(
                "cross_field",
                put((*D, "testSplit"), t[1]),
                put((*D, "validationSplit"), t[0]),
            )
        ),
        # Asks for more than any node has: the scheduler says so, the operator fails the job.
        st.integers(NODE_GPUS + 1, 16).map(
            lambda n: case("cross_field", put((*R, "gpusPerNode"), n), cluster=True)
        ),
        st.integers(NODE_CPUS + 1, 10**5).map(
            lambda n: case("cross_field", put((*R, "cpu"), str(n)), cluster=True)
        ),
        st.integers(NODE_MEMORY_GI + 1, 10**6).map(
            lambda n: case("cross_field", put((*R, "memory"), f"{n}Gi"), cluster=True)
        ),
        st.from_regex(r"[a-z]{1,10}", fullmatch=True).map(
            lambda v: case(
                "cross_field",
                put((*R, "nodeSelector"), {f"kubetune.io/absent-{v}": "true"}),
                cluster=True,
            )
        ),
        # Valid to the models, invalid as a pod: the API server refuses the rank pod.
        st.from_regex(r"[a-z]{1,10}", fullmatch=True).map(
            lambda v: case(
                "cross_field",
                put((*R, "tolerations", 0, "value"), v),  # operator Exists takes no value
                names=(wire((*R, "tolerations", 0, "operator")),),
                cluster=True,
            )
        ),
        st.integers(0, 10**6).map(
            lambda n: case(
                "cross_field",
                put((*R, "tolerations", 0, "tolerationSeconds"), n),  # NoExecute only
                names=(wire((*R, "tolerations", 0, "effect")),),
                cluster=True,
            )
        ),
        st.just(
            case(
                "cross_field",
                put((*R, "tolerations", 0), {"operator": "Equal", "value": "x"}),  # key needed
                names=(wire((*R, "tolerations", 0, "operator")),),
                cluster=True,
            )
        ),
        # The credentials Secret, or a key in it, is not there.
        st.from_regex(r"[a-z][a-z0-9-]{2,20}", fullmatch=True)
        .filter(lambda v: v != SECRET)
        .map(lambda v: case("cross_field", put((*REF, "name"), v), cluster=True)),
        st.tuples(
            st.sampled_from(["accessKeyIdKey", "secretAccessKeyKey"]),
            st.from_regex(r"[A-Z_]{3,20}", fullmatch=True),
        )
        .filter(lambda t: t[1] not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
        .map(lambda t: case("cross_field", put((*REF, t[0]), t[1]), cluster=True)),
        st.just(case("cross_field", put(S, None))),  # storage: null, required on a cluster
    )


SECRET_KEYS = st.sampled_from(
    [
        "accessKeyId",
        "secretAccessKey",
        "awsSecretAccessKey",
        "password",
        "token",
        "sessionToken",
        "credentials",
        "apiKey",
        "hfToken",
    ]
)


def inline_secrets() -> st.SearchStrategy[Case]:
    where = st.sampled_from([S, REF, ("spec",), ("spec", "model"), D, R])
    return st.one_of(
        st.tuples(where, SECRET_KEYS).map(
            lambda t: case("inline_secret", put((*t[0], t[1]), INLINE))
        ),
        st.sampled_from(["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN"]).map(
            lambda n: case("inline_secret", put((*R, "env"), [{"name": n, "value": INLINE}]))
        ),
        st.sampled_from([INLINE, [INLINE], {"name": SECRET, "value": INLINE}]).map(
            lambda v: case("inline_secret", put(REF, v), names=(wire(REF), wire((*REF, "value"))))
        ),
        st.sampled_from(["train", "validation", "test"]).map(
            lambda k: case(
                "inline_secret", put((*D, k), f"s3://AKIAEXAMPLE:{INLINE}@bucket/{k}.jsonl")
            )
        ),
        st.sampled_from(["http", "https"]).map(
            lambda p: case("inline_secret", put((*S, "endpoint"), f"{p}://kt:{INLINE}@minio:9000"))
        ),
        st.just(case("inline_secret", put(("spec", "model", "source"), f"hf://u:{INLINE}@org/m"))),
    )


def missing_required() -> st.SearchStrategy[Case]:
    paths = [*required_paths(), S, ("metadata", "name")]
    return st.sampled_from(paths).map(lambda p: case("missing_required", drop(p)))


def from_leaves(
    kind: Callable[[tuple[FieldPath, dict[str, Any]]], st.SearchStrategy[Case]],
    pred: Callable[[dict[str, Any]], bool],
) -> st.SearchStrategy[Case]:
    return st.sampled_from(leaves(pred)).flatmap(kind)


def name_too_long() -> st.SearchStrategy[Case]:
    # A valid object name (<= 253) but no valid job name (<= 52): the operator refuses it.
    return st.integers(53, 253).map(
        lambda n: case("absurd_size", put(("metadata", "name"), "n" + "a" * (n - 1)))
    )


# Per kind: (strategy, how many distinct cases, examples hypothesis may try for them).
KINDS: dict[str, tuple[Callable[[], st.SearchStrategy[Case]], int]] = {
    "wrong_type": (lambda: from_leaves(wrong_type, lambda s: "type" in s), 50),
    "out_of_range": (lambda: from_leaves(out_of_range, has_range), 35),
    "bad_enum": (lambda: from_leaves(bad_enum, lambda s: "enum" in s), 25),
    "missing_required": (missing_required, 14),
    "absurd_size": (
        lambda: st.one_of(from_leaves(absurd, can_be_absurd), name_too_long()),
        30,
    ),
    "bad_format": (bad_formats, 35),
    "cross_field": (cross_field, 35),
    "inline_secret": (inline_secrets, 25),
}


def collect(strategy: st.SearchStrategy[Case], n: int) -> list[Case]:
    found: dict[str, Case] = {}

    @settings(
        max_examples=n * 8,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def draw(c: Case) -> None:
        if len(found) < n:
            found.setdefault(c.key, c)

    draw()
    return list(found.values())


def generate() -> list[Case]:
    cases: dict[str, Case] = {}
    for make, n in KINDS.values():
        for c in collect(make(), n):
            cases.setdefault(c.key, c)
    return list(cases.values())


# --------------------------------------------------------------------------- the test


def base_job(s3: dict[str, str]) -> dict[str, Any]:
    job = chat_job("base", s3, evaluation={"gates": [GATE]})
    job["spec"]["resources"]["tolerations"] = [TOLERATION]
    return job


def locally_invalid(doc: dict[str, Any]) -> bool:
    """What the operator's own checks say without a cluster (no Secret, no scheduler)."""
    from kubetune_operator.api.validation import SpecError
    from kubetune_operator.reconcile.executor import validate_on_cluster as validate_job

    try:
        validate_job(doc, check_secret=False)
    except SpecError:
        return True
    return False


@pytest.fixture(autouse=True)
def _short_queue_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the operator starts: fail jobs that cannot be placed after seconds, not never."""
    monkeypatch.setenv("KUBETUNE_QUEUE_TIMEOUT_SECONDS", str(QUEUE_TIMEOUT))


@dataclass
class Outcome:
    case: Case
    name: str
    marker: str
    verdict: str = "pending"  # rejected-at-apply | failed-naming-field | unhandled: ... | stuck
    message: str = ""


def _kubectl_apply(cp: ControlPlane, ns: str, doc: dict[str, Any]) -> tuple[int, str]:
    """The real `kubectl apply -f -` (it writes last-applied-configuration itself)."""
    doc = copy.deepcopy(doc)
    doc["metadata"].pop("annotations", None)
    proc = cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc), check=False)
    if proc.returncode == 0:
        return 201, proc.stdout
    err = proc.stderr
    if "error validating data" in err:
        # kubectl's own check against the published schema, before anything is sent:
        # `ValidationError(FineTuneJob.spec.model): unknown field "token" in ...`.
        fields = re.findall(
            r"ValidationError\(FineTuneJob\.([\w.\[\]]+)\): unknown field \"(\w+)\"", err
        )
        paths = [f"{parent}.{name}" for parent, name in fields]
        paths += re.findall(r"ValidationError\(FineTuneJob\.([\w.\[\]]+)\): invalid type", err)
        return 400, f"{'; '.join(paths)}: {err}"
    if " is invalid: " in err:
        return 422, err
    m = re.search(r"Error from server \((\w+)\)", err)
    return {"Invalid": 422, "BadRequest": 400}.get(m.group(1) if m else "", 0), err


def _message(job: dict[str, Any]) -> str:
    status = job.get("status") or {}
    parts = [str(c.get("message", "")) for c in status.get("conditions") or []]
    parts.append(str((status.get("lastFailure") or {}).get("message", "")))
    return " | ".join(p for p in parts if p)


def _list_jobs(cp: ControlPlane, ns: str) -> dict[str, dict[str, Any]]:
    body = cp.get_json(f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs")
    return {j["metadata"]["name"]: j for j in body["items"]}


def _cleanup(cp: ControlPlane, ns: str) -> None:
    """Delete every job while the operator runs (kopf's finalizer comes off with it)."""
    path = f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs"
    status, body = cp.request("DELETE", path)
    assert status == 200, body
    deadline = time.monotonic() + 30
    while _list_jobs(cp, ns) and time.monotonic() < deadline:
        time.sleep(1)
    left = _list_jobs(cp, ns)
    if left:
        print(f"cleanup: the operator had not released {len(left)} job(s) after 30 s")
    for name in left:  # let them go, so the namespace can
        cp.request(
            "PATCH",
            f"{path}/{name}",
            {"metadata": {"finalizers": None}},
            content_type="application/merge-patch+json",
        )


def test_generated_bad_specs_are_rejected(
    control_plane: ControlPlane,
    namespace: str,
    canary_s3: dict[str, str],
    operator: Operator,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    cp, ns = control_plane, namespace
    started = time.monotonic()
    base = base_job(canary_s3)
    base_doc = {**base, "metadata": {"name": "base", "namespace": ns}}
    assert not locally_invalid(base_doc), "the base job must be valid"

    cases = generate()
    kinds = Counter(c.kind for c in cases)
    print(
        f"generated {len(cases)} distinct cases in {time.monotonic() - started:.1f}s: {dict(kinds)}"
    )
    assert len(cases) >= 200, kinds
    # Every case is invalid: the operator's own checks say so, or the schema (types, which the
    # models would coerce), or only the cluster can (Secret, capacity, pod validation).
    token = secrets.token_hex(6)
    for i, c in enumerate(cases):
        if c.kind == "wrong_type" or c.cluster_only:
            continue
        doc = build(base, c, f"bad-{i:03d}", ns, "x")
        doc["metadata"].pop("annotations")
        if ("del", ("metadata", "name"), None) not in c.ops:
            assert locally_invalid(doc), f"case {i} is valid: {c.kind} {c.describe()}"

    # --- apply them all (as kubectl apply sends a new object), then wait for all at once
    outcomes: list[Outcome] = []
    created: dict[str, Outcome] = {}
    jobs_path = f"/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs"
    for i, c in enumerate(cases):
        marker = f"kt-inline-{token}-{i:03d}"
        out = Outcome(c, f"bad-{i:03d}", marker)
        outcomes.append(out)
        doc = build(base, c, out.name, ns, marker)
        if c.kind in VIA_KUBECTL:
            status, out.message = _kubectl_apply(cp, ns, doc)
        else:
            status, body = cp.request("POST", jobs_path, doc)
            out.message = str(body.get("message") if isinstance(body, dict) else body)
        if status == 201:
            out.name = doc["metadata"].get("name", out.name)
            created[out.name] = out
            continue
        if status in (400, 422) and names_field(out.message, c.names):
            out.verdict = "rejected-at-apply"
        else:
            out.verdict = f"unhandled: HTTP {status} without the field"
    applied_s = time.monotonic() - started

    restarts = 0
    deadline = time.monotonic() + WAIT_TIMEOUT
    jobs: dict[str, dict[str, Any]] = {}
    try:
        while True:
            assert operator.proc is not None
            if operator.proc.poll() is not None:
                restarts += 1
                print(f"operator exited {operator.proc.returncode}; restarting it")
                operator.start()
            jobs = _list_jobs(cp, ns)
            phases = {n: (j.get("status") or {}).get("phase") for n, j in jobs.items()}
            waiting = [n for n in created if n in jobs and phases[n] not in TERMINAL]
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(1)
        waited_s = time.monotonic() - started - applied_s
        # Two more timer ticks: terminal jobs stay terminal and no timer trips over them.
        time.sleep(SETTLE)
        jobs = _list_jobs(cp, ns)

        log = operator.log()
        events = cp.get_json(f"/api/v1/namespaces/{ns}/events")["items"]
        for name, out in created.items():
            job = jobs.get(name)
            if job is None:
                out.verdict = "unhandled: the job disappeared"
                continue
            phase = (job.get("status") or {}).get("phase")
            out.message = _message(job)
            if phase not in TERMINAL:
                out.verdict = f"stuck in {phase}"
            elif phase != "Failed":
                out.verdict = f"unhandled: ended {phase}"
            elif not names_field(out.message, out.case.names):
                out.verdict = "unhandled: Failed without naming the field"
            else:
                out.verdict = "failed-naming-field"
            mine = [e for e in events if e["involvedObject"].get("name") == name]
            spread = json.dumps([job.get("status"), mine])
            if out.case.secret and out.marker in spread + log:
                out.verdict = "unhandled: the inline secret spread to the status, Events or log"
        # A handler that crashed (not a PermanentError for a bad spec) is unhandled for its job.
        crashed = re.findall(
            r"\[[^\]/]+/([^\]]+)\] (?:Handler|Timer) '[^']+' failed with an exception", log
        )
        for name in crashed:
            if name in created:
                created[name].verdict = "unhandled: a handler crashed on it"
        tracebacks = log.count("Traceback (most recent call last)")
    finally:
        t = time.monotonic()
        _cleanup(cp, ns)
        print(f"cleanup {time.monotonic() - t:.1f}s")

    tried = len(outcomes)
    rejected = sum(o.verdict in ("rejected-at-apply", "failed-naming-field") for o in outcomes)
    stuck = sum(o.verdict.startswith("stuck") for o in outcomes)
    unhandled = tried - rejected - stuck

    # --- report
    table: dict[str, Counter[str]] = {}
    for o in outcomes:
        table.setdefault(o.case.kind, Counter())[o.verdict.split(":")[0]] += 1
    print(f"\n{'kind':<18}{'tried':>6}{'at apply':>10}{'Failed':>8}{'other':>7}")
    for kind, counts in table.items():
        n = sum(counts.values())
        at, failed = counts["rejected-at-apply"], counts["failed-naming-field"]
        print(f"{kind:<18}{n:>6}{at:>10}{failed:>8}{n - at - failed:>7}")
    for o in outcomes:
        if o.verdict not in ("rejected-at-apply", "failed-naming-field"):
            print(f"  {o.name} {o.case.kind} {o.case.describe()}: {o.verdict}: {o.message[:300]}")
    with (tmp_path / "cases.jsonl").open("w") as f:
        for o in outcomes:
            row = {"name": o.name, "kind": o.case.kind, "case": o.case.describe()[:300]}
            f.write(json.dumps({**row, "verdict": o.verdict, "message": o.message[:500]}) + "\n")
    print(f"every case, its verdict and message: {tmp_path / 'cases.jsonl'}")
    print(
        f"applied {tried} in {applied_s:.1f}s, waited {waited_s:.1f}s for {len(created)} jobs; "
        f"operator tracebacks {tracebacks}"
    )
    # A handler that died with a traceback counts as a crash, like an exited process.
    crashes = restarts + tracebacks
    print(f"rejected {rejected}/{tried}, operator restarts {crashes}, stuck {stuck}")
    record(
        request.node.nodeid,
        inputs_tried=tried,
        inputs_rejected=rejected,
        inputs_unhandled=unhandled,
        operator_restarts=crashes,
        stuck=stuck,
        jobs_run=len(created),
    )
    assert (rejected, crashes, stuck) == (tried, 0, 0)
