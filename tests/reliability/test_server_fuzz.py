"""The inference server survives fuzzed requests: no 5xx, no crash, memory bounded.

Two tiny models are trained once for the module with the trainer CLI (tiny-llama causal-lm on
the support-chat data, builtin:minilm classification on a slice of support-intents), and each
is served by ``python -m kubetune_trainer serve`` as a subprocess. Hypothesis then sends
requests built from the server's own ``/openapi.json``: bodies generated from the request
schemas, the same bodies mutated (a field dropped, an unknown field, a value of the wrong type),
arbitrary JSON, non-JSON bytes, invalid UTF-8, lone surrogates, odd content types, random
methods and unknown paths. A fixed list of hostile requests (deep nesting, 5000-digit numbers,
bodies over the size limit, sent whole or chunked, thousands of prompts, a concurrent burst)
runs as well.

Every answer must be below 500; every 4xx must carry a JSON ``{"error": {"message": ...}}``
body; a 2xx stream must end with ``[DONE]`` and hold no in-band error; nothing may hang (each
request has a timeout). Afterwards the process is alive, ``/healthz`` and ``/readyz`` answer
200, the log holds no traceback, and RSS grew by less than ``RSS_BOUND_MIB``.

The servers run with ``--max-tokens-limit 16`` so that valid generation requests stay fast on
a shared CPU; requests over the limit are part of the fuzz (they must get a 400).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.integration.test_trainer import config, finish, free_port, start
from tests.reliability.record import record

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
INTENTS = ROOT / "examples" / "data" / "support-intents"
# Hypothesis requests per server, on top of the fixed hostile ones; raise it to hunt for more.
EXAMPLES = int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "360"))
RSS_BOUND_MIB = 300
MAX_BODY = 1 << 20  # the server's default --max-body-bytes
TIMEOUT = 30.0  # per request: a hang is a failure
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FROB"]
SERVED = {"causal-lm": ["/v1/chat/completions", "/v1/completions"], "classifier": ["/v1/classify"]}
CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=zz",
    "application/xml",
    "image/png",
    "*/*",
    "application/json; boundary",
]


# -- the models and servers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train both tiny models at once (a few steps each); returns kind -> model directory."""
    base = tmp_path_factory.mktemp("fuzz-models")
    lm, cls = base / "lm", base / "cls"
    lm.mkdir()
    cls.mkdir()
    rows = (INTENTS / "train.jsonl").read_text().splitlines()[:96]
    (cls / "train.jsonl").write_text("\n".join(rows) + "\n")
    fast = {"maxSteps": 3, "perDeviceBatchSize": 8}
    lm_cfg = config(
        lm,
        data={"validation": None, "test": None, "validationSplit": 0.05},
        hyperparameters=fast,
        evaluation={"compareBase": False, "bleuSamples": 2, "maxNewTokens": 4},
    )
    cls_cfg = config(
        cls,
        task="sequence-classification",
        model={"source": "builtin:minilm", "maxSeqLength": 64},
        data={
            "train": str(cls / "train.jsonl"),
            "validation": None,
            "test": None,
            "format": "classification",
        },
        hyperparameters=fast,
        evaluation={"compareBase": False},
    )
    procs = {"causal-lm": (lm, start(lm, lm_cfg)), "classifier": (cls, start(cls, cls_cfg))}
    out: dict[str, Path] = {}
    for kind, (tmp, proc) in procs.items():
        rc, log = finish(proc, 600)
        assert rc == 0, f"training the {kind} model failed:\n{log[-3000:]}"
        out[kind] = tmp / "store" / "model"
    return out


@dataclass
class Server:
    kind: str
    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    model_name: str = "model"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


def _start_server(kind: str, model: Path, log: Path) -> Server:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "kubetune_trainer",
        "serve",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-concurrency",
        "4",
        "--max-tokens-limit",
        "16",
    ]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    return Server(kind, proc, f"http://127.0.0.1:{port}", log)


def _wait_ready(server: Server, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise AssertionError(f"{server.kind} server exited:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{server.kind} server not ready after {timeout}s")


@pytest.fixture(scope="module")
def servers(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    logs = tmp_path_factory.mktemp("fuzz-logs")
    running = {
        kind: _start_server(kind, path, logs / f"{kind}.log") for kind, path in models.items()
    }
    try:
        for server in running.values():
            _wait_ready(server)
        yield running
    finally:
        for server in running.values():
            if server.alive():
                server.proc.terminate()
        for server in running.values():
            try:
                server.proc.wait(30)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(10)


# -- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    chunked: bool = False  # send the body without Content-Length
    # "invalid": built so that any correct server must refuse it (4xx); "valid": built so that
    # it must be served (2xx, or 429 when busy); "fuzz": either, depending on what was drawn.
    intent: str = "fuzz"

    def describe(self) -> str:
        body = (self.body or b"")[:160]
        more = f" (+{len(self.body or b'') - 160} bytes)" if len(self.body or b"") > 160 else ""
        return f"{self.method} {self.path} [{self.content_type}] {body!r}{more}"


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0  # answered correctly: 2xx/3xx with a sound body, 4xx with a JSON error
    server_errors: list[str] = field(default_factory=list)  # 5xx, in-band errors, crashes
    wrong: list[str] = field(default_factory=list)  # 4xx without a JSON error, hangs, bad 2xx
    statuses: Counter[int] = field(default_factory=Counter)
    sent_by: Counter[str] = field(default_factory=Counter)  # per intent
    ok_by: Counter[str] = field(default_factory=Counter)  # invalid: refused; valid: served
    wrong_by: Counter[str] = field(default_factory=Counter)  # per intent: wrong, not 5xx


@dataclass
class Routes:
    """What the server's /openapi.json promises, to tell requests built to be invalid."""

    known: set[str]  # every listed path
    posts: set[str]  # paths that take a POST at all
    bodies: dict[str, tuple[set[str], set[str]]]  # POST path -> (required, allowed) fields

    @classmethod
    def from_openapi(cls, openapi: dict[str, Any]) -> Routes:
        defs = openapi.get("components", {}).get("schemas", {})
        known = {*openapi["paths"], "/openapi.json"}
        posts = {p for p, ops in openapi["paths"].items() if "post" in ops}
        bodies = {}
        for path, ops in openapi["paths"].items():
            content = ((ops.get("post") or {}).get("requestBody") or {}).get("content", {})
            if "application/json" in content:
                schema = content["application/json"]["schema"]
                if "$ref" in schema:
                    schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
                props = set(schema.get("properties", {}))
                bodies[path] = (set(schema.get("required", [])), props)
        return cls(known, posts, bodies)

    def intent(self, req: Req) -> str:
        """ "invalid" when the request is wrong whatever the server's state: a method no route
        takes, a POST to a route without one, or a body that is over the size limit, not a
        JSON object, lacks a required field or carries an unknown one (the schemas forbid
        extra fields). Anything else stays "fuzz"."""
        if req.intent != "fuzz":
            return req.intent
        if req.path != "/" and req.path.endswith("/"):
            return "fuzz"  # a 307 to the path without the slash, whatever the method
        if req.method in ("PUT", "DELETE", "PATCH", "TRACE", "FROB"):
            return "invalid"  # no route takes these
        if req.method != "POST":
            return "fuzz"
        if req.path in self.known and req.path not in self.posts:
            return "invalid"  # 405
        if req.path not in self.bodies:
            return "fuzz"
        required, allowed = self.bodies[req.path]
        data = req.body or b""
        if len(data) > MAX_BODY:
            return "invalid"
        try:
            body = json.loads(data)  # as the server reads it (surrogatepass for bytes)
        except (ValueError, RecursionError):
            return "invalid"
        if not isinstance(body, dict) or not required <= set(body) or set(body) - allowed:
            return "invalid"
        return "fuzz"


def _dump(value: Any, ascii_only: bool) -> bytes:
    text = json.dumps(value, ensure_ascii=ascii_only)
    # Non-ASCII output may hold lone surrogates: they go out as (invalid) UTF-8 bytes.
    return text.encode("utf-8", "surrogatepass")


def check(server: Server, req: Req, tally: Tally) -> None:
    """Send one request and judge the answer."""
    tally.sent += 1
    tally.sent_by[req.intent] += 1
    before = len(tally.wrong)
    try:
        _answer(server, req, tally)
    finally:
        if len(tally.wrong) > before:
            tally.wrong_by[req.intent] += 1


def _answer(server: Server, req: Req, tally: Tally) -> None:
    import httpx

    headers = {} if req.content_type is None else {"content-type": req.content_type}
    content: Any = req.body
    if req.chunked and req.body is not None:
        data = req.body
        content = (data[i : i + 65536] for i in range(0, len(data), 65536))
    try:
        with httpx.Client(base_url=server.base, timeout=TIMEOUT) as client:
            resp = client.request(
                req.method, req.path, content=content, headers=headers, params=list(req.params)
            )
    except httpx.TimeoutException:
        tally.wrong.append(f"no answer in {TIMEOUT}s: {req.describe()}")
        return
    except httpx.TransportError as err:
        if not server.alive():
            tally.server_errors.append(f"server died on {req.describe()}: {err!r}")
            raise AssertionError(
                f"the {server.kind} server died:\n{server.log.read_text()[-3000:]}"
            ) from None
        tally.server_errors.append(f"connection failed ({err!r}): {req.describe()}")
        return
    status = resp.status_code
    tally.statuses[status] += 1
    what = f"{status} {resp.text[:300]!r} for {req.describe()}"
    if status >= 500:
        tally.server_errors.append(what)
        return
    if req.intent == "valid" and status >= 400 and status != 429:
        tally.wrong.append(f"a valid request refused: {what}")
        return
    if req.intent == "invalid" and status < 400:
        tally.wrong.append(f"an invalid request accepted: {what}")
        return
    if 400 <= status < 500:
        if req.method == "HEAD":
            tally.ok += 1  # no body by definition
            tally.ok_by[req.intent] += 1
            return
        try:
            error = resp.json()["error"]
            assert isinstance(error["message"], str) and error["message"]
            assert resp.headers["content-type"].startswith("application/json")
        except Exception:
            tally.wrong.append(f"4xx without a JSON error body: {what}")
            return
        tally.ok += 1
        tally.ok_by[req.intent] += 1
        return
    if 200 <= status < 300 and req.method == "POST" and req.path.startswith("/v1/"):
        ctype = resp.headers.get("content-type", "")
        if ctype.startswith("text/event-stream"):
            if '"internal_error"' in resp.text:
                tally.server_errors.append(f"in-band stream error: {what}")
                return
            if not resp.text.rstrip().endswith("data: [DONE]"):
                tally.wrong.append(f"stream without [DONE]: {what}")
                return
        else:
            try:
                body = resp.json()
                assert "choices" in body or "results" in body
            except Exception:
                tally.wrong.append(f"2xx without a result: {what}")
                return
    tally.ok += 1
    tally.ok_by[req.intent] += 1


# -- hypothesis strategies ---------------------------------------------------------------------

_SURROGATES = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
TEXT = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="ascii"), max_size=40),
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), _SURROGATES, st.text(max_size=5)),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**18, max_value=10**60),
    st.floats(),  # NaN and +-Infinity too: Python's json writes (and reads) them
    TEXT,
)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=25,
)


def from_schema(schema: dict[str, Any], defs: dict[str, Any], model_name: str) -> Any:
    """A strategy for values that match a (pydantic-generated) JSON schema."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: from_schema(defs[name], defs, model_name))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, defs, model_name) for s in schema[key]])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low = schema.get("minimum")
        high = schema.get("maximum")
        return st.integers(
            min_value=None if low is None else int(low),
            max_value=None if high is None else int(high),
        )
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        return st.floats(
            min_value=low,
            max_value=high,
            exclude_min="exclusiveMinimum" in schema,
            exclude_max="exclusiveMaximum" in schema,
            allow_nan=False,
        )
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=40)
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs, model_name)
        low = schema.get("minItems", 0)
        return st.lists(items, min_size=low, max_size=max(low, 4))
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))

        def prop(name: str, sub: dict[str, Any]) -> Any:
            base = from_schema(sub, defs, model_name)
            if name == "model":  # mostly the served name or none, so real work happens
                return st.one_of(st.just(model_name), st.none(), base)
            return base

        return st.fixed_dictionaries(
            {k: prop(k, v) for k, v in props.items() if k in required},
            optional={k: prop(k, v) for k, v in props.items() if k not in required},
        )
    return ANY_JSON


@st.composite
def mutated(draw: st.DrawFn, valid: Any) -> Any:
    """A schema-valid body with one thing wrong."""
    body = draw(valid)
    if not isinstance(body, dict):
        return body
    op = draw(st.sampled_from(["drop", "extra", "wrong-type", "wrong-type", "huge", "nest"]))
    keys = sorted(body)
    if op == "drop" and keys:
        body.pop(draw(st.sampled_from(keys)))
    elif op == "extra":
        body[draw(TEXT)] = draw(ANY_JSON)
    elif op == "wrong-type" and keys:
        body[draw(st.sampled_from(keys))] = draw(ANY_JSON)
    elif op == "huge" and keys:
        body[draw(st.sampled_from(keys))] = draw(
            st.sampled_from([10**30, -(10**30), 1e308, -1e308, 2**63, "x" * 50_000, ["a"] * 2000])
        )
    elif op == "nest" and keys:
        depth = draw(st.integers(10, 800))  # deeper: json.dumps here recurses too far
        value: Any = draw(SCALARS)
        for _ in range(depth):
            value = [value]
        body[draw(st.sampled_from(keys))] = value
    return body


def request_strategy(openapi: dict[str, Any], model_name: str, served: list[str]) -> Any:
    """Requests of every kind; schema bodies mostly go to the routes this server's model serves
    (the others answer 404 before reading the body)."""
    defs = openapi.get("components", {}).get("schemas", {})
    known = [*openapi["paths"], "/openapi.json"]
    bodies: dict[str, Any] = {}
    for path, ops in openapi["paths"].items():
        for method, op in ops.items():
            content = (op.get("requestBody") or {}).get("content", {})
            if method == "post" and "application/json" in content:
                schema = content["application/json"]["schema"]
                bodies[path] = from_schema(schema, defs, model_name)
    assert bodies, "the OpenAPI document lists no request bodies"
    post_paths = sorted(bodies)
    body_paths = st.sampled_from([*served, *served, *served, *post_paths])
    json_ct = st.sampled_from(["application/json", "application/json", None, "text/plain"])
    ascii_only = st.booleans()

    def post(path: str, body: Any, ct: str | None, asc: bool) -> Req:
        return Req("POST", path, _dump(body, asc), ct)

    valid = body_paths.flatmap(
        lambda p: st.builds(post, st.just(p), bodies[p], json_ct, ascii_only)
    )
    broken = body_paths.flatmap(
        lambda p: st.builds(post, st.just(p), mutated(bodies[p]), json_ct, ascii_only)
    )
    any_json = st.builds(post, st.sampled_from(known), ANY_JSON, json_ct, ascii_only)
    raw_bytes = st.one_of(
        st.binary(max_size=300),
        st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.sampled_from([b"", b"null", b"[]", b"{", b'{"', b"\xff\xfe{}", b"NaN"]),
        st.builds(
            lambda piece, n: piece * n,
            st.sampled_from([b"{}", b"\x00", b"[", b"{"]),
            st.integers(1, 20_000),
        ),
    )
    raw = st.builds(
        lambda path, body, ct: Req("POST", path, body, ct),
        st.sampled_from(post_paths + known),
        raw_bytes,
        st.sampled_from(CONTENT_TYPES),
    )
    unknown_path = st.text(max_size=30).map(lambda t: _quote_path("/" + t))
    suffixed = st.builds(lambda p, t: p + "/" + t, st.sampled_from(known), st.text(max_size=8))
    paths = st.one_of(st.sampled_from(known), unknown_path, suffixed.map(_quote_path))
    params = st.lists(st.tuples(st.text(max_size=8), st.text(max_size=20)), max_size=3)
    methods = st.builds(
        lambda m, p, b, ct, q: Req(m, p, b, ct, tuple(q)),
        st.sampled_from(METHODS),
        paths,
        st.none() | raw_bytes,
        st.sampled_from(CONTENT_TYPES),
        params,
    )
    return st.one_of(valid, valid, broken, broken, any_json, raw, methods)


def _quote_path(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


# -- fixed hostile requests --------------------------------------------------------------------


def hostile(kind: str) -> list[Req]:
    """Fixed hostile requests; those not marked here get their intent from ``Routes.intent``."""
    lm = kind == "causal-lm"
    route = "/v1/completions" if lm else "/v1/classify"
    field_ = "prompt" if kind == "causal-lm" else "text"
    j = "application/json"
    deep = b"[" * 100_000 + b"]" * 100_000
    big = json.dumps({field_: "x" * (MAX_BODY + 1000)}).encode()
    many = json.dumps({field_: ["hello"] * 20_000, "max_tokens": 1}).encode()
    digits = b'{"' + field_.encode() + b'": "hi", "max_tokens": 1' + b"0" * 5000 + b"}"
    return [
        Req("POST", route, b"", j),
        Req("POST", route, b"null", j),
        Req("POST", route, deep, j),
        Req("POST", route, b'{"' + field_.encode() + b'": ' + deep + b"}", j),
        Req("POST", route, b"{" * 50_000, j),
        Req("POST", route, digits, j),
        Req("POST", route, b'{"' + field_.encode() + b'": "hi", "temperature": NaN}', j),
        Req("POST", route, b'{"' + field_.encode() + b'": "hi", "max_tokens": Infinity}', j),
        Req("POST", route, b'{"' + field_.encode() + b'": "caf\xc3\x28"}', j),
        Req("POST", route, b'{"' + field_.encode() + b'": "\\ud800"}', j),
        Req("POST", route, b'{"' + field_.encode() + b'": ["ok", "\\udfff"]}', j),
        # Subnormal temperatures are valid JSON numbers in range; they once overflowed the
        # logits to inf/nan and failed sampling with a 500.
        # (For the classifier, "prompt" is an unknown field and "text" is missing.)
        Req(
            "POST",
            route,
            b'{"prompt": "hi", "temperature": 5e-324, "max_tokens": 4}',
            j,
            intent="valid" if lm else "invalid",
        ),
        Req(
            "POST",
            route,
            b'{"prompt": "hi", "temperature": 1e-39, "stream": true}',
            j,
            intent="valid" if lm else "invalid",
        ),
        Req(
            "POST",
            route,
            b'{"prompt": "hi", "top_p": 5e-324, "max_tokens": 4}',
            j,
            intent="valid" if lm else "invalid",
        ),
        Req("POST", route, big, j),
        Req("POST", route, big, j, chunked=True),
        Req("POST", route, b"x" * (4 * MAX_BODY), "application/octet-stream", chunked=True),
        Req("POST", route, many, j),
        Req("POST", "/v1/chat/completions", b'{"messages": []}', j, intent="invalid"),
        Req(
            "POST",
            "/v1/chat/completions",
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}
            ).encode(),
            j,
            intent="valid" if lm else "invalid",  # the classifier does not serve chat: 404
        ),
        Req("POST", "/v1/classify", json.dumps({"text": ["t"] * 300}).encode(), j),
        Req("GET", "/" + "a" * 2000, intent="invalid"),
        Req("GET", "/v1/models/"),
        Req("GET", "/docs", intent="invalid"),  # the server has no docs pages
        Req("POST", "/healthz", b"{}", j),
        Req("DELETE", "/v1/models"),
    ]


def warm_up(kind: str) -> list[Req]:
    j = "application/json"
    if kind == "causal-lm":
        chat = {"messages": [{"role": "user", "content": "my vpn drops"}], "max_tokens": 16}
        return [
            Req("POST", "/v1/chat/completions", json.dumps(chat).encode(), j, intent="valid"),
            Req(
                "POST",
                "/v1/completions",
                b'{"prompt": ["a", "b"], "max_tokens": 16}',
                j,
                intent="valid",
            ),
        ]
    body = json.dumps({"text": ["my vpn drops"] * 64}).encode()
    return [Req("POST", "/v1/classify", body, j, intent="valid")]


def burst(server: Server, tally: Tally) -> None:
    """Twice --max-concurrency requests at once: each is answered (200 or 429), none fails."""
    if server.kind == "causal-lm":
        body = {"messages": [{"role": "user", "content": "my laptop won't boot"}], "max_tokens": 16}
        path = "/v1/chat/completions"
    else:
        body = {"text": ["printer jammed again"] * 64}
        path = "/v1/classify"
    req = Req("POST", path, json.dumps(body).encode(), "application/json", intent="valid")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: check(server, req, tally), range(8)))


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["causal-lm", "classifier"])
def test_fuzzed_requests_get_no_5xx_and_memory_stays_bounded(
    kind: str, servers: dict[str, Server], request: pytest.FixtureRequest
) -> None:
    import httpx

    server = servers[kind]
    openapi = httpx.get(f"{server.base}/openapi.json", timeout=TIMEOUT).json()
    tally = Tally()
    # Warm up (first forward passes, allocator pools) before the baseline RSS.
    for req in warm_up(kind):
        check(server, req, tally)
    rss_start = server.rss_mib()
    started = time.monotonic()

    routes = Routes.from_openapi(openapi)
    for req in hostile(kind):
        check(server, replace(req, intent=routes.intent(req)), tally)

    served = SERVED[kind]
    assert set(served) <= set(openapi["paths"]), sorted(openapi["paths"])
    strategy = request_strategy(openapi, server.model_name, served)

    @settings(
        max_examples=EXAMPLES,
        derandomize=not os.environ.get("KUBETUNE_FUZZ_RANDOM"),  # set it to explore new cases
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def fuzz(req: Req) -> None:
        check(server, replace(req, intent=routes.intent(req)), tally)

    fuzz()
    burst(server, tally)
    elapsed = time.monotonic() - started

    alive = server.alive()
    health = httpx.get(f"{server.base}/healthz", timeout=TIMEOUT).status_code if alive else None
    ready = httpx.get(f"{server.base}/readyz", timeout=TIMEOUT).status_code if alive else None
    rss_end = server.rss_mib() if alive else float("nan")
    log = server.log.read_text(errors="replace")
    tracebacks = log.count("Traceback (most recent call last)")
    crashes = 0 if alive else 1
    statuses = dict(sorted(tally.statuses.items()))
    print(
        f"\n{kind}: {tally.sent} requests in {elapsed:.1f}s, statuses {statuses}; "
        f"ok {tally.ok}, 5xx/in-band errors {len(tally.server_errors)}, wrong {len(tally.wrong)}; "
        f"RSS {rss_start:.0f} -> {rss_end:.0f} MiB; tracebacks in log {tracebacks}; "
        f"by intent sent {dict(tally.sent_by)}, ok {dict(tally.ok_by)}, "
        f"wrong {dict(tally.wrong_by)}"
    )
    # Only requests built to be invalid count as bad inputs; valid ones answered correctly are a
    # figure of their own; the rest ("fuzz": either, depending on the draw) count as requests.
    record(
        request.node.nodeid,
        inputs_tried=tally.sent_by["invalid"],
        inputs_rejected=tally.ok_by["invalid"],
        inputs_unhandled=tally.sent_by["invalid"] - tally.ok_by["invalid"],
        server_requests=tally.sent,
        valid_requests_answered=tally.ok_by["valid"],
        server_wrong_answers=tally.wrong_by["valid"] + tally.wrong_by["fuzz"],
        server_5xx=len(tally.server_errors) + crashes,
    )
    assert alive, f"the server exited:\n{log[-3000:]}"
    assert health == 200 and ready == 200, (health, ready)
    assert tally.sent >= 300
    assert not tally.server_errors, "\n".join(tally.server_errors[:10])
    assert not tally.wrong, "\n".join(tally.wrong[:10])
    assert tracebacks == 0, log[-4000:]
    assert rss_end - rss_start < RSS_BOUND_MIB, (rss_start, rss_end)
