"""The inference server over real HTTP: a server subprocess per scenario on a loopback port.

Model fixtures return a model directory (HF files + kubetune.json); to serve trainer-produced
models instead, change what ``causal_model_dir`` / ``classifier_model_dir`` return.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from kubetune_trainer.modelcard import (  # noqa: E402
    ModelCard,
    ModelCardError,
    read_model_card,
    write_model_card,
)
from kubetune_trainer.serve import build_parser, main, settings_from_args  # noqa: E402
from kubetune_trainer.serve_state import ServerState  # noqa: E402
from kubetune_trainer.serve_stream import StopBuffer, cut_at_stop  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHAT = [
    {"role": "system", "content": "You are a support agent."},
    {"role": "user", "content": "My router keeps dropping the connection."},
]
# Texts the crafted classifier head maps to: a confident "billing", a confident "escalate"
# and exactly uniform scores (see _craft_head).
CONFIDENT_TEXT = "Please refund the double charge on my invoice."
ESCALATE_TEXT = "I want to speak to a manager right now, this is unacceptable!"
UNSURE_TEXT = "The weather is nice today."
LABELS = ["billing", "technical", "escalate"]


def _card(task: Any, labels: list[str] | None = None, **extra: Any) -> ModelCard:
    return ModelCard(
        task=task,
        base_model="builtin:tiny-llama" if task == "causal-lm" else "builtin:minilm",
        method="full",
        adapter=False,
        labels=labels or [],
        max_seq_length=128,
        data_fingerprint="sha256:test",
        hyperparameters={"learning_rate": 1e-4},
        metrics={"eval_loss": 1.25},
        seed=0,
        created_at="2026-01-01T00:00:00Z",
        kubetune_version="0.1.0",
        **extra,
    )


# ------------------------------------------------------------------------------ model fixtures


@pytest.fixture(scope="session")
def causal_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A causal-LM model directory: the tiny Llama plus a model card."""
    from kubetune_trainer.builtin_models import resolve_builtin

    out = tmp_path_factory.mktemp("models") / "tiny-chat"
    shutil.copytree(resolve_builtin("tiny-llama"), out)
    write_model_card(out, _card("causal-lm"))
    return out


def _craft_head(model: Any, tokenizer: Any) -> None:
    """Set the fresh 3-way head so the three test texts get known scores.

    Solves for the minimum-norm head mapping the pooled features of CONFIDENT/ESCALATE/UNSURE
    to logits (5,0,0), (0,0,5) and (0,0,0): each row has 3 constraints in 385 unknowns.
    """
    import torch

    texts = [CONFIDENT_TEXT, ESCALATE_TEXT, UNSURE_TEXT]
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        pooled = model.bert(**batch).pooler_output.double()  # (3, hidden)
        feats = torch.cat([pooled, torch.ones(3, 1, dtype=torch.float64)], dim=1)
        targets = torch.tensor([[5.0, 0, 0], [0, 0, 5.0], [0, 0, 0]], dtype=torch.float64)
        solution = torch.linalg.pinv(feats) @ targets  # (hidden + 1, 3)
        model.classifier.weight.copy_(solution[:-1].T.float())
        model.classifier.bias.copy_(solution[-1].float())


@pytest.fixture(scope="session")
def classifier_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sequence-classification model directory: MiniLM with a crafted 3-label head."""
    import transformers

    from kubetune_trainer.builtin_models import resolve_builtin

    base = resolve_builtin("minilm")
    auto_model: Any = transformers.AutoModelForSequenceClassification
    auto_tok: Any = transformers.AutoTokenizer
    tokenizer = auto_tok.from_pretrained(str(base))
    model = auto_model.from_pretrained(
        str(base),
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    ).eval()
    _craft_head(model, tokenizer)
    out = tmp_path_factory.mktemp("models") / "support-classifier"
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    write_model_card(out, _card("sequence-classification", LABELS))
    return out


# ------------------------------------------------------------------------------ server harness


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    paths = [str(ROOT / "trainer"), str(ROOT / "operator"), str(ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "2",
    }


def _poll(url: str, want: int, proc: subprocess.Popen[bytes], timeout: float = 180) -> Any:
    """Poll ``url`` until it answers ``want``; fail if the server dies or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} while waiting for {url}")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == want:
                return response
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # polling interval, not a fixed wait
    raise AssertionError(f"{url} did not answer {want} within {timeout} s")


def start_server(model_dir: Path | str, tmp: Path, *args: str, wait_ready: bool = True) -> Server:
    port = _free_port()
    log = tmp / f"server-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubetune_trainer.serve",
                "--model",
                str(model_dir),
                "--port",
                str(port),
                *args,
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        _poll(f"{server.url}/{'readyz' if wait_ready else 'healthz'}", 200, proc)
    except AssertionError as exc:
        stop_server(server)
        raise AssertionError(f"{exc}\n--- server log ---\n{server.output()}") from None
    return server


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="module")
def causal_server(
    causal_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = start_server(
        causal_model_dir,
        tmp_path_factory.mktemp("causal"),
        "--max-concurrency",
        "8",
        "--max-tokens-limit",
        "64",
        "--max-body-bytes",
        "16384",
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def classifier_server(
    classifier_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = start_server(
        classifier_model_dir, tmp_path_factory.mktemp("classifier"), "--max-concurrency", "64"
    )
    yield server
    stop_server(server)


def post(server: Server, path: str, body: Any = None, **kw: Any) -> Any:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


def sse_events(response: Any) -> list[Any]:
    """Parse a server-sent-event stream into JSON payloads, ending with the string "[DONE]"."""
    events: list[Any] = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(response: Any, status: int, param: str | None = None, text: str = "") -> None:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) >= {"message", "type", "param"}
    assert err["param"] == param, err
    assert text.lower() in err["message"].lower(), err


# ------------------------------------------------------------------------------ model card


def test_model_card_round_trip_and_readme(tmp_path: Path) -> None:
    card = _card("sequence-classification", LABELS, escalation_threshold=0.7)
    write_model_card(tmp_path, card)
    assert read_model_card(tmp_path) == card
    readme = (tmp_path / "README.md").read_text()
    assert "sequence-classification" in readme and "`escalate`" in readme
    assert "eval_loss" in readme and "kubetune.json" in readme


def test_model_card_errors_name_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match=r"kubetune\.json.*not found"):
        read_model_card(tmp_path)
    data = _card("causal-lm").model_dump(mode="json")
    data["escalation_threshold"] = 3
    (tmp_path / "kubetune.json").write_text(json.dumps(data))
    with pytest.raises(ModelCardError, match=r"kubetune\.json.*'escalation_threshold'"):
        read_model_card(tmp_path)
    del data["seed"]
    data["escalation_threshold"] = 0.5
    (tmp_path / "kubetune.json").write_text(json.dumps(data))
    with pytest.raises(ModelCardError, match="field 'seed'"):
        read_model_card(tmp_path)
    (tmp_path / "kubetune.json").write_text("{nope")
    with pytest.raises(ModelCardError, match="not valid JSON"):
        read_model_card(tmp_path)
    with pytest.raises(ValueError, match="labels"):
        _card("sequence-classification", [])


# ------------------------------------------------------------------------------ pure helpers


def test_stop_buffer_holds_back_partial_stop_strings() -> None:
    buf = StopBuffer(["</s>", "STOP"])
    assert buf.feed("hello <") == ("hello ", False)
    assert buf.feed("/") == ("", False)
    assert buf.feed("x") == ("</x", False)
    assert buf.feed(" ST") == (" ", False)
    assert buf.feed("OP and more") == ("", True)
    assert cut_at_stop("abcSTOPdef</s>", ["</s>", "STOP"]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_cli_settings_and_threshold_override() -> None:
    args = build_parser().parse_args(
        ["--model", "/models/support/", "--escalation-threshold", "0.99", "--port", "9000"]
    )
    settings = settings_from_args(args)
    assert settings.model_name == "support" and settings.port == 9000
    state = ServerState(settings=settings, card=_card("sequence-classification", LABELS))
    assert state.threshold() == 0.99
    no_override = settings_from_args(build_parser().parse_args(["--model", "m"]))
    assert ServerState(settings=no_override, card=state.card).threshold() == 0.5


def test_main_rejects_missing_dir_and_bad_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["--model", str(tmp_path)]) == 2
    assert "kubetune.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--max-concurrency", "0"])


# ------------------------------------------------------------------------------ causal LM


def test_models_endpoint_lists_model_and_card(causal_server: Server) -> None:
    body = httpx.get(f"{causal_server.url}/v1/models").json()
    assert body["object"] == "list"
    (info,) = body["data"]
    assert info["id"] == "tiny-chat" and info["object"] == "model" and info["ready"] is True
    assert info["card"]["task"] == "causal-lm" and info["card"]["base_model"].startswith("builtin:")
    assert httpx.get(f"{causal_server.url}/healthz").json() == {"status": "ok", "detail": None}


def test_chat_completion_and_usage(causal_server: Server, causal_model_dir: Path) -> None:
    import transformers

    tok: Any = transformers.AutoTokenizer.from_pretrained(str(causal_model_dir))
    expected_prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    r = post(
        causal_server,
        "/v1/chat/completions",
        {"model": "tiny-chat", "messages": CHAT, "max_tokens": 12, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-chat"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(expected_prompt)
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 12


def test_chat_accepts_text_parts_and_sampling(causal_server: Server) -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
        }
    ]
    r = post(
        causal_server,
        "/v1/chat/completions",
        {"messages": messages, "max_tokens": 5, "temperature": 0.8, "top_p": 0.9},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 5


def test_completion_single_and_batch(causal_server: Server, causal_model_dir: Path) -> None:
    import transformers

    tok: Any = transformers.AutoTokenizer.from_pretrained(str(causal_model_dir))
    prompt = "Kubernetes schedules containers onto"
    r = post(
        causal_server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["usage"]["prompt_tokens"] == len(tok(prompt)["input_ids"])
    assert body["usage"]["completion_tokens"] <= 8
    r2 = post(
        causal_server,
        "/v1/completions",
        {"prompt": [prompt, "The sun rose"], "max_tokens": 4, "temperature": 0},
    )
    assert r2.status_code == 200, r2.text
    choices = r2.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[0]["text"] == body["choices"][0]["text"][: len(choices[0]["text"])]


def test_chat_streaming_matches_non_streaming(causal_server: Server) -> None:
    req = {"messages": CHAT, "max_tokens": 16, "temperature": 0}
    full = post(causal_server, "/v1/chat/completions", req).json()
    with httpx.stream(
        "POST",
        f"{causal_server.url}/v1/chat/completions",
        timeout=60,
        json={**req, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == full["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == full["usage"]


def test_completion_streaming_and_stop(causal_server: Server) -> None:
    req = {"prompt": "Hello", "max_tokens": 10, "temperature": 0}
    full = post(causal_server, "/v1/completions", req).json()
    with httpx.stream(
        "POST", f"{causal_server.url}/v1/completions", timeout=60, json={**req, "stream": True}
    ) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in events[:-1])
    assert text == full["choices"][0]["text"]
    assert all("usage" not in c for c in events[:-1])  # only sent when asked for
    # A stop string taken from the greedy output cuts both forms before it.
    full_text = full["choices"][0]["text"]
    if len(full_text) >= 2:
        stop = full_text[1:3] if len(full_text) >= 3 else full_text[1:]
        cut = full_text[: full_text.find(stop)]
        stopped = post(causal_server, "/v1/completions", {**req, "stop": [stop]}).json()
        assert stopped["choices"][0] == {
            **stopped["choices"][0],
            "text": cut,
            "finish_reason": "stop",
        }
        with httpx.stream(
            "POST",
            f"{causal_server.url}/v1/completions",
            timeout=60,
            json={**req, "stop": stop, "stream": True},
        ) as r:
            events = sse_events(r)
        assert "".join(c["choices"][0]["text"] for c in events[:-1]) == cut
        assert events[-2]["choices"][0]["finish_reason"] == "stop"


LONG_PROMPT = "hello there " * 400  # ~800 tokens: more than the tiny model's 512 context


@pytest.mark.parametrize(
    ("body", "status", "param", "text"),
    [
        ({"messages": []}, 400, "messages", "at least 1"),
        ({}, 400, "messages", "required"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", ""),
        ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "required"),
        ({"messages": "hi"}, 400, "messages", "list"),
        ({"messages": CHAT, "temperature": "hot"}, 400, "temperature", "number"),
        ({"messages": CHAT, "temperature": 9}, 400, "temperature", ""),
        ({"messages": CHAT, "top_p": 0}, 400, "top_p", ""),
        ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens", ""),
        ({"messages": CHAT, "max_tokens": "many"}, 400, "max_tokens", "integer"),
        ({"messages": CHAT, "max_tokens": 65}, 400, "max_tokens", "limit of 64"),
        ({"messages": CHAT, "stream": "yes please"}, 400, "stream", "boolean"),
        ({"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
        ({"messages": CHAT, "n": 2}, 400, "n", ""),
        ({"messages": CHAT, "frobnicate": True}, 400, "frobnicate", "unknown field"),
        ({"messages": CHAT, "model": "gpt-4"}, 404, "model", "does not exist"),
        ({"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages", "context"),
        ([1, 2], 400, None, "JSON object"),
        ("just a string", 400, None, "JSON object"),
    ],
)
def test_chat_bad_requests(
    causal_server: Server, body: Any, status: int, param: str | None, text: str
) -> None:
    assert_error(post(causal_server, "/v1/chat/completions", body), status, param, text)


@pytest.mark.parametrize(
    ("body", "param", "text"),
    [
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": [1]}, "prompt[0]", "string"),
        ({"prompt": LONG_PROMPT}, "prompt", "context"),
        ({"prompt": ["a", "b"], "stream": True}, "prompt", "single prompt"),
        ({"prompt": "x", "max_tokens": 1000}, "max_tokens", "limit"),
    ],
)
def test_completion_bad_requests(
    causal_server: Server, body: Any, param: str | None, text: str
) -> None:
    assert_error(post(causal_server, "/v1/completions", body), 400, param, text)


def test_malformed_bodies(causal_server: Server) -> None:
    url = f"{causal_server.url}/v1/chat/completions"
    headers = {"content-type": "application/json"}
    assert_error(httpx.post(url, content=b"", headers=headers), 400, None, "empty")
    assert_error(
        httpx.post(url, content=b'{"messages": [', headers=headers), 400, None, "not valid JSON"
    )
    assert_error(httpx.post(url, content=b"\xff\xfe", headers=headers), 400, None, "")
    # Over the 16 KiB limit, declared up front: refused from the header alone.
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 20000}]}).encode()
    assert_error(httpx.post(url, content=big, headers=headers), 413, None, "larger than")

    # Chunked (no Content-Length): refused while streaming in, before the end arrives.
    def chunks() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 1000
        yield b'"}]}'

    assert_error(httpx.post(url, content=chunks(), headers=headers), 413, None, "larger than")


def test_wrong_task_and_unknown_paths(causal_server: Server) -> None:
    r = post(causal_server, "/v1/classify", {"text": "hi"})
    assert_error(r, 404, None, "serves causal-lm")
    assert_error(post(causal_server, "/v1/nothing", {}), 404, None, "not found")
    r = httpx.get(f"{causal_server.url}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_metrics_exposed(causal_server: Server) -> None:
    post(causal_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    post(causal_server, "/v1/completions", {"prompt": 5})
    text = httpx.get(f"{causal_server.url}/metrics").text
    assert 'kubetune_serve_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'kubetune_serve_requests_total{endpoint="/v1/completions",status="400"}' in text
    assert "kubetune_serve_request_duration_seconds_bucket" in text
    assert 'kubetune_serve_prompt_tokens_total{endpoint="/v1/completions"}' in text
    assert 'kubetune_serve_completion_tokens_total{endpoint="/v1/completions"}' in text
    assert "kubetune_serve_queue_depth" in text and "kubetune_serve_ready 1.0" in text


# ------------------------------------------------------------------------------ classification


def test_classify_labels_scores_and_escalation(classifier_server: Server) -> None:
    r = post(
        classifier_server, "/v1/classify", {"text": [CONFIDENT_TEXT, ESCALATE_TEXT, UNSURE_TEXT]}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "support-classifier" and body["usage"]["prompt_tokens"] > 0
    confident, escalate, unsure = body["results"]
    for result in body["results"]:
        assert list(result["scores"]) == LABELS
        assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["score"] == max(result["scores"].values())
    assert confident["label"] == "billing" and confident["score"] > 0.95
    assert confident["escalate"] is False and confident["escalation_reason"] is None
    # The escalation class escalates even when the model is sure of it.
    assert escalate["label"] == "escalate" and escalate["score"] > 0.95
    assert escalate["escalate"] is True and escalate["escalation_reason"] == "escalation_label"
    # Uniform scores are below the card's 0.5 threshold.
    assert unsure["score"] == pytest.approx(1 / 3, abs=1e-3)
    assert unsure["escalate"] is True and unsure["escalation_reason"] == "low_confidence"
    single = post(classifier_server, "/v1/classify", {"text": CONFIDENT_TEXT}).json()
    assert single["results"][0]["label"] == "billing"


def test_classify_micro_batches_concurrent_requests(classifier_server: Server) -> None:
    texts = [f"{CONFIDENT_TEXT} #{i}" for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        responses = list(
            pool.map(lambda t: post(classifier_server, "/v1/classify", {"text": t}), texts)
        )
    assert all(r.status_code == 200 for r in responses)
    assert all(r.json()["results"][0]["label"] == "billing" for r in responses)
    metrics = httpx.get(f"{classifier_server.url}/metrics").text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("kubetune_serve_batch_size_")
    }
    # Fewer forward passes than texts: concurrent requests shared batches.
    assert values["kubetune_serve_batch_size_count"] < values["kubetune_serve_batch_size_sum"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "text"),
        ({"text": 5}, "text"),
        ({"text": []}, "text"),
        ({"text": ["a", 1]}, "text[1]"),
        ({"text": "a", "labels": []}, "labels"),
    ],
)
def test_classify_bad_requests(classifier_server: Server, body: Any, param: str) -> None:
    assert_error(post(classifier_server, "/v1/classify", body), 400, param)


def test_classifier_refuses_generation(classifier_server: Server) -> None:
    r = post(classifier_server, "/v1/chat/completions", {"messages": CHAT})
    assert_error(r, 404, None, "serves sequence-classification")
    assert_error(
        post(classifier_server, "/v1/completions", {"prompt": "x"}),
        404,
        None,
        "sequence-classification",
    )


# ------------------------------------------------------------------------------ overload


def test_overload_answers_429_immediately(causal_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(
        causal_model_dir, tmp_path, "--max-concurrency", "1", "--max-tokens-limit", "400"
    )
    try:
        url = f"{server.url}/v1/completions"
        slow = {"prompt": "Hello", "max_tokens": 400, "temperature": 0}
        with httpx.stream("POST", url, json={**slow, "stream": True}, timeout=120) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # the one slot is now taken
            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                rejected = list(pool.map(lambda _: post(server, "/v1/completions", slow), range(8)))
            assert time.monotonic() - started < 10
            for r in rejected:
                assert_error(r, 429, None, "limit of 1")
                assert r.headers["retry-after"] == "1"
            # Probes are never limited.
            assert httpx.get(f"{server.url}/readyz").status_code == 200
            assert httpx.get(f"{server.url}/metrics").status_code == 200
        # Leaving the block hangs up mid-stream: the server cancels that generation and frees
        # the slot, so a new request gets through soon (polled, not slept for).
        deadline = time.monotonic() + 30
        while post(server, "/v1/completions", {**slow, "max_tokens": 2}).status_code != 200:
            assert time.monotonic() < deadline, "the slot was not freed after the client left"
            time.sleep(0.05)
        # Many concurrent slow generations: some are served, the rest refused, none hang.
        with ThreadPoolExecutor(6) as pool:
            statuses = [
                r.status_code
                for r in pool.map(
                    lambda _: post(server, "/v1/completions", {**slow, "max_tokens": 60}), range(6)
                )
            ]
        assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'endpoint="/v1/completions",status="429"' in metrics
    finally:
        stop_server(server)


def sse_events_from(lines: Iterator[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line]


# ------------------------------------------------------------------------------ lifecycle


def test_readiness_and_sigterm_drain(causal_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(
        causal_model_dir,
        tmp_path,
        "--load-delay",
        "1",
        "--shutdown-delay",
        "1",
        "--max-tokens-limit",
        "150",
        wait_ready=False,
    )
    try:
        # Listening (healthz answered) but the model is not loaded yet.
        r = httpx.get(f"{server.url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert_error(post(server, "/v1/chat/completions", {"messages": CHAT}), 503, None, "loading")
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["ready"] is False
        _poll(f"{server.url}/readyz", 200, server.proc)

        req = {
            "messages": CHAT,
            "max_tokens": 150,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=req, timeout=120
        ) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # generation is under way
            server.proc.send_signal(signal.SIGTERM)
            # Readiness flips at once, while the listener stays up for --shutdown-delay.
            draining = _poll(f"{server.url}/readyz", 503, server.proc, timeout=5)
            assert draining.json()["status"] == "draining"
            events = sse_events_from(lines)
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        finish = json.loads(events[-3])["choices"][0]["finish_reason"]
        assert finish == "stop" or usage["completion_tokens"] == 150
        assert server.proc.wait(timeout=60) == 0, server.output()
    finally:
        stop_server(server)


# ------------------------------------------------------------------------------ s3 models


def test_serves_model_downloaded_from_s3(
    causal_model_dir: Path, moto_server: str, s3_bucket: str, tmp_path: Path
) -> None:
    import boto3

    client: Any = boto3.session.Session().client(
        "s3", endpoint_url=moto_server, region_name="us-east-1"
    )
    for path in causal_model_dir.rglob("*"):
        if path.is_file():
            key = f"models/chat/{path.relative_to(causal_model_dir).as_posix()}"
            client.upload_file(str(path), s3_bucket, key)
    os.environ["AWS_ENDPOINT_URL"] = moto_server  # inherited by the server subprocess
    try:
        server = start_server(
            f"s3://{s3_bucket}/models/chat",
            tmp_path,
            "--download-dir",
            str(tmp_path / "downloads"),
        )
    finally:
        del os.environ["AWS_ENDPOINT_URL"]
    try:
        info = httpx.get(f"{server.url}/v1/models").json()["data"][0]
        assert info["id"] == "chat" and info["card"]["task"] == "causal-lm"
        assert (tmp_path / "downloads" / "chat" / "kubetune.json").is_file()
        r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 200, r.text
    finally:
        stop_server(server)


def test_classify_accepts_curl_form_content_type(classifier_server: Server) -> None:
    # `curl -d '{...}'` sends application/x-www-form-urlencoded; every endpoint takes JSON.
    url = f"{classifier_server.url}/v1/classify"
    form = {"content-type": "application/x-www-form-urlencoded"}
    ok = httpx.post(url, content=b'{"text": "printer jammed again"}', headers=form)
    assert ok.status_code == 200 and ok.json()["results"][0]["label"]
    assert_error(httpx.post(url, content=b"", headers=form), 400, None, "empty")
