"""Preflight of a FineTuneJob object as the API server holds it: schema + cluster checks.

Pure: the credentials Secret's key names come in as `SecretRead`, read by the executor.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from kubetune_operator.api.models import FineTuneJob
from kubetune_operator.api.validation import FieldError, SpecError, explain, validate_document
from kubetune_operator.reconcile.plan_types import SecretRead

Obj = dict[str, Any]
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
_SECRETISH = ("secret", "password", "token", "accesskey", "credential")


def _doc(body: Obj, spec: Any) -> Obj:
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": spec,
    }


def _safe(e: FieldError) -> FieldError:
    # Never echo a value that sits under a secret-looking key (rule 6).
    if any(word in e.path.lower() for word in _SECRETISH):
        return FieldError(e.path, e.message, None)
    return e


def _pruned_errors(body: Obj) -> list[FieldError]:
    """Errors in what the user applied: kubectl apply on 1.20 prunes unknown fields silently,
    so a typo or an inline secret only shows in the last-applied-configuration annotation."""
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
    if not raw:
        return []
    try:
        applied = json.loads(raw)
    except ValueError:
        return []
    if not isinstance(applied, dict):
        return []
    try:
        FineTuneJob.model_validate(_doc(body, applied.get("spec")))
    except ValidationError as err:
        return [
            FieldError(e.path, e.message + " (dropped by the API server; fix the manifest)")
            for e in explain(err)
        ]
    return []


def _cluster_errors(job: FineTuneJob) -> list[FieldError]:
    spec = job.spec
    out: list[FieldError] = []
    if spec.storage is None:
        out.append(
            FieldError(
                "spec.storage",
                "required on a cluster (checkpoints, progress and the model go there); "
                "accepted: {bucket, prefix, endpoint, region, credentialsSecretRef}",
            )
        )
    for path, uri in (
        ("spec.data.train", spec.data.train),
        ("spec.data.validation", spec.data.validation),
        ("spec.data.test", spec.data.test),
    ):
        if uri is not None and not uri.startswith("s3://"):
            out.append(
                FieldError(
                    path,
                    "a local path does not exist in the trainer pods; "
                    "accepted on a cluster: s3://<bucket>/<key>",
                    repr(uri),
                )
            )
    for path, uri in (
        ("spec.model.source", spec.model.source),
        ("spec.model.tokenizer", spec.model.tokenizer),
    ):
        if uri is not None and "://" not in uri and not uri.startswith("builtin:"):
            out.append(
                FieldError(
                    path,
                    "a local path does not exist in the trainer pods; accepted on a "
                    "cluster: builtin:<name>, s3://<bucket>/<prefix>, hf://<org>/<name>",
                    repr(uri),
                )
            )
    return out


def _secret_errors(job: FineTuneJob, namespace: str, secret: SecretRead | None) -> list[FieldError]:
    storage = job.spec.storage
    ref = storage.credentials_secret_ref if storage else None
    if ref is None or secret is None or secret.name != ref.name:
        return []
    path = "spec.storage.credentialsSecretRef"
    if not secret.found:
        return [
            FieldError(f"{path}.name", f"Secret not found in namespace {namespace}", repr(ref.name))
        ]
    if secret.keys is None:  # no RBAC to read Secrets: the pods will tell
        return []
    out = []
    for field, key in (
        ("accessKeyIdKey", ref.access_key_id_key),
        ("secretAccessKeyKey", ref.secret_access_key_key),
    ):
        if key not in secret.keys:
            have = ", ".join(sorted(secret.keys)) or "none"
            out.append(
                FieldError(
                    f"{path}.{field}",
                    f"Secret {ref.name!r} has no key {key!r}; keys present: {have}",
                )
            )
    return out


def secret_name(body: Obj) -> str | None:
    """The credentials Secret a raw job names, if any (read before the spec is validated)."""
    storage = (body.get("spec") or {}).get("storage")
    ref = storage.get("credentialsSecretRef") if isinstance(storage, dict) else None
    name = ref.get("name") if isinstance(ref, dict) else None
    return name if isinstance(name, str) and name else None


def validate_job(body: Obj, *, secret: SecretRead | None = None) -> FineTuneJob:
    """The job, or SpecError listing every problem (field path, value, what is accepted).

    `secret`: the credentials Secret as read; None skips that check.
    """
    namespace = (body.get("metadata") or {}).get("namespace") or "default"
    try:
        job = validate_document(_doc(body, body.get("spec")))
    except SpecError as err:
        raise SpecError("spec", [_safe(e) for e in err.errors]) from None
    errors = [_safe(e) for e in _pruned_errors(body)]
    errors += _cluster_errors(job)
    if not errors:
        errors += _secret_errors(job, namespace, secret)
    if errors:
        raise SpecError("spec", errors)
    return job


def describe(err: SpecError, limit: int = 5) -> str:
    parts = [str(e) for e in err.errors[:limit]]
    if len(err.errors) > limit:
        parts.append(f"... and {len(err.errors) - limit} more")
    return "; ".join(parts)
