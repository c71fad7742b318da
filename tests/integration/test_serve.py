"""The inference server over real HTTP on loopback, serving models the trainer produced here.

Two session fixtures run the trainer CLI (``python -m kubetune_trainer train``) once each, on
the bundled example data: the tiny Llama fine-tuned on support-chat (a few seconds) and MiniLM
fine-tuned on four support-intents classes (the longest setup here: 12 steps, 25-45 s on a busy
2-core CPU). Every server is a subprocess on 127.0.0.1: the causal LM through
``python -m kubetune_trainer serve`` (what the inference Deployment runs), the classifier through
the ``kubetune serve`` CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
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

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
CHAT = [
    {"role": "system", "content": "You are a support agent."},
    {"role": "user", "content": "My router keeps dropping the connection."},
]

# The classifier learns these four support-intents classes; `escalate` is the card's
# escalation label (the trainer's default).
CLASSES = ("billing", "escalate", "network", "printer")
# In-domain texts (not in the training rows) and what the trained classifier makes of them.
PRINTER_TEXT = "The printer on floor 3 is jammed again and won't print."
WIFI_TEXT = "my laptop will not connect to the office wifi"
ESCALATE_TEXT = "I want to speak to a manager right now, this is unacceptable!"


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


# ------------------------------------------------------------------------------ trained models


def _subset(src: Path, dst: Path, rows: int, labels: tuple[str, ...] | None = None) -> str:
    """The first ``rows`` rows of a JSONL file (only those with one of ``labels``, if given)."""
    kept: list[str] = []
    for line in src.read_text().splitlines():
        if labels is None or json.loads(line)["label"] in labels:
            kept.append(line)
        if len(kept) == rows:
            break
    dst.write_text("\n".join(kept) + "\n")
    return str(dst)


def _train(tmp: Path, cfg: dict[str, Any]) -> Path:
    """Run the trainer CLI on ``cfg``; return the model directory it wrote (``<store>/model``)."""
    store = tmp / "store"
    cfg = {
        **cfg,
        "deepspeed": {"zeroStage": 0},
        "checkpointing": {"everySteps": 1000},
        "output": {"uri": str(store)},
        "telemetry": {
            "metricsPort": 0,
            "progressIntervalSeconds": 1,
            "terminationLog": str(tmp / "termination-log"),
        },
    }
    (tmp / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "train", "--config", str(tmp / "config.json")],
        env={**_env(), "OMP_NUM_THREADS": "1"},
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    # The final checkpoint (weights + optimizer state, ~270 MB for MiniLM) is not served.
    shutil.rmtree(store / "checkpoints", ignore_errors=True)
    assert (store / "model" / "kubetune.json").is_file()
    return store / "model"


@pytest.fixture(scope="session")
def causal_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama after 6 full fine-tuning steps on support-chat."""
    tmp = tmp_path_factory.mktemp("train-chat")
    chat = DATA / "support-chat"
    return _train(
        tmp,
        {
            "task": "causal-lm",
            "model": {"source": "builtin:tiny-llama", "maxSeqLength": 128},
            "data": {
                "train": str(chat / "train.jsonl"),
                "validation": _subset(chat / "validation.jsonl", tmp / "validation.jsonl", 8),
                "test": _subset(chat / "test.jsonl", tmp / "test.jsonl", 8),
                "format": "chat",
            },
            "method": "full",
            "hyperparameters": {
                "learningRate": 3e-3,
                "perDeviceBatchSize": 8,
                "maxSteps": 6,
                "warmupRatio": 0.0,
            },
            "evaluation": {"compareBase": False, "bleuSamples": 2, "maxNewTokens": 4},
            "job": {"name": "tiny-chat", "namespace": "test"},
        },
    )


@pytest.fixture(scope="session")
def classifier_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM after 12 full fine-tuning steps on four support-intents classes."""
    tmp = tmp_path_factory.mktemp("train-intents")
    intents = DATA / "support-intents"
    return _train(
        tmp,
        {
            "task": "sequence-classification",
            "model": {"source": "builtin:minilm", "maxSeqLength": 40},
            "data": {
                "train": _subset(intents / "train.jsonl", tmp / "train.jsonl", 192, CLASSES),
                "validation": _subset(
                    intents / "validation.jsonl", tmp / "validation.jsonl", 16, CLASSES
                ),
                "test": _subset(intents / "test.jsonl", tmp / "test.jsonl", 16, CLASSES),
                "format": "classification",
            },
            "method": "full",
            "hyperparameters": {
                "learningRate": 1e-3,
                "perDeviceBatchSize": 16,
                "maxSteps": 12,
                "warmupSteps": 1,
            },
            "evaluation": {"compareBase": False},
            "job": {"name": "support-intents", "namespace": "test"},
        },
    )


@pytest.fixture(scope="session")
def classifier_probabilities(classifier_model_dir: Path) -> dict[str, dict[str, float]]:
    """What the trained classifier outputs in-process for the test texts: label -> probability."""
    import torch
    import transformers

    auto_tok: Any = transformers.AutoTokenizer
    auto_model: Any = transformers.AutoModelForSequenceClassification
    tok = auto_tok.from_pretrained(str(classifier_model_dir))
    model = auto_model.from_pretrained(str(classifier_model_dir)).eval()
    texts = [PRINTER_TEXT, WIFI_TEXT, ESCALATE_TEXT]
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for text in texts:
            probs = model(**tok(text, return_tensors="pt")).logits.softmax(-1)[0].tolist()
            out[text] = {model.config.id2label[i]: p for i, p in enumerate(probs)}
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


def _kubetune_cli() -> list[str]:
    script = Path(sys.executable).with_name("kubetune")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kubetune_operator.cli"]


def start_server(
    model_dir: Path | str, tmp: Path, *args: str, wait_ready: bool = True, cli: bool = False
) -> Server:
    """Serve ``model_dir`` on a free loopback port.

    ``cli``: through ``kubetune serve MODEL``; otherwise ``python -m kubetune_trainer serve``.
    """
    port = _free_port()
    log = tmp / f"server-{port}.log"
    if cli:
        cmd = [*_kubetune_cli(), "serve", str(model_dir)]
    else:
        cmd = [sys.executable, "-m", "kubetune_trainer", "serve", "--model", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env())
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
        "--model-name",
        "tiny-chat",
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
    """The classifier with the card's escalation threshold, under its default name ("model")."""
    server = start_server(
        classifier_model_dir,
        tmp_path_factory.mktemp("classifier"),
        "--max-concurrency",
        "64",
        "--max-body-bytes",
        "4096",
        cli=True,
    )
    yield server
    stop_server(server)


def post(server: Server, path: str, body: Any = None, **kw: Any) -> Any:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


def sse_events(lines: Iterator[str]) -> list[Any]:
    """Parse server-sent-event lines into JSON payloads, ending with the string "[DONE]"."""
    events: list[Any] = []
    for line in lines:
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


def _eval_report(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir.parent / "eval.json").read_text())  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ causal LM


def test_models_endpoint_describes_the_trained_model(
    causal_server: Server, causal_model_dir: Path
) -> None:
    body = httpx.get(f"{causal_server.url}/v1/models").json()
    assert body["object"] == "list"
    (info,) = body["data"]
    assert info["id"] == "tiny-chat" and info["object"] == "model" and info["ready"] is True
    card = info["card"]
    assert card["task"] == "causal-lm" and card["base_model"] == "builtin:tiny-llama"
    # The card is the one this session's training run wrote.
    report = _eval_report(causal_model_dir)
    assert card["data_fingerprint"] == report["data"]["fingerprint"]
    assert card["metrics"]["loss"] == pytest.approx(report["tuned"]["loss"])
    assert httpx.get(f"{causal_server.url}/healthz").json() == {"status": "ok", "detail": None}
    assert httpx.get(f"{causal_server.url}/readyz").json()["status"] == "ready"


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
    assert choice["message"]["content"].strip()
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(expected_prompt)
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 12
    else:
        assert choice["finish_reason"] == "stop"


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
    assert 1 <= r.json()["usage"]["completion_tokens"] <= 5


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
    assert 1 <= body["usage"]["completion_tokens"] <= 8
    assert body["choices"][0]["text"]
    r2 = post(
        causal_server,
        "/v1/completions",
        {"prompt": [prompt, "The sun rose"], "max_tokens": 4, "temperature": 0},
    )
    assert r2.status_code == 200, r2.text
    choices = r2.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    # Greedy: the 4-token answer is the start of the 8-token one.
    assert choices[0]["text"] and body["choices"][0]["text"].startswith(choices[0]["text"])


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
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert sum(1 for piece in content if piece) >= 2  # streamed in pieces, not one blob
    assert "".join(content) == full["choices"][0]["message"]["content"] != ""
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == full["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == full["usage"]


def test_completion_streaming_and_stop(causal_server: Server) -> None:
    req = {"prompt": "Hello", "max_tokens": 10, "temperature": 0}
    full = post(causal_server, "/v1/completions", req).json()
    with httpx.stream(
        "POST", f"{causal_server.url}/v1/completions", timeout=60, json={**req, "stream": True}
    ) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in events[:-1])
    assert text == full["choices"][0]["text"]
    assert all("usage" not in c for c in events[:-1])  # only sent when asked for
    # A stop string taken from the greedy output cuts both forms before it.
    full_text = full["choices"][0]["text"]
    assert len(full_text) >= 3, full
    stop = full_text[1:3]
    cut = full_text[: full_text.find(stop)]
    stopped = post(causal_server, "/v1/completions", {**req, "stop": [stop]}).json()
    assert stopped["choices"][0]["text"] == cut
    assert stopped["choices"][0]["finish_reason"] == "stop"
    with httpx.stream(
        "POST",
        f"{causal_server.url}/v1/completions",
        timeout=60,
        json={**req, "stop": stop, "stream": True},
    ) as r:
        events = sse_events(r.iter_lines())
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
        ({"prompt": "x", "temperature": [0.5]}, "temperature", "number"),
    ],
)
def test_completion_bad_requests(
    causal_server: Server, body: Any, param: str | None, text: str
) -> None:
    assert_error(post(causal_server, "/v1/completions", body), 400, param, text)


def test_malformed_bodies(causal_server: Server) -> None:
    url = f"{causal_server.url}/v1/chat/completions"
    headers = {"content-type": "application/json"}
    assert_error(httpx.post(url, content=b"", headers=headers), 400, "messages", "body is empty")
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
    # The server is still up and answering after all of that.
    ok = post(causal_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


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


def test_classify_serves_the_trained_classifier(
    classifier_server: Server,
    classifier_model_dir: Path,
    classifier_probabilities: dict[str, dict[str, float]],
) -> None:
    texts = [PRINTER_TEXT, WIFI_TEXT, ESCALATE_TEXT]
    r = post(classifier_server, "/v1/classify", {"text": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "classification" and body["model"] == "model"
    assert body["usage"]["prompt_tokens"] > 0
    card = json.loads((classifier_model_dir / "kubetune.json").read_text())
    assert card["labels"] == list(CLASSES) and card["escalation_label"] == "escalate"
    assert card["escalation_threshold"] == 0.5
    for text, result in zip(texts, body["results"], strict=True):
        # Exactly what the trained model says in-process, through the label map.
        assert list(result["scores"]) == list(CLASSES)
        expected = classifier_probabilities[text]
        for label, score in result["scores"].items():
            assert score == pytest.approx(expected[label], abs=1e-4), (text, result)
        assert result["label"] == max(expected, key=expected.__getitem__)
        assert result["score"] == max(result["scores"].values())
        assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    printer, wifi, escalate = body["results"]
    # Confident in-domain answers (above the card's 0.5): the agent answers them itself.
    assert printer["label"] == "printer" and printer["score"] > 0.5, printer
    assert wifi["label"] == "network" and wifi["score"] > 0.5, wifi
    for result in (printer, wifi):
        assert result["escalate"] is False and result["escalation_reason"] is None
    # The escalation class hands off to a person, however confident the model is.
    assert escalate["label"] == "escalate", escalate
    assert escalate["escalate"] is True and escalate["escalation_reason"] == "escalation_label"
    # One text alone gets the same answer as inside a padded batch.
    (single,) = post(classifier_server, "/v1/classify", {"text": PRINTER_TEXT}).json()["results"]
    assert {**single, "score": 0, "scores": {}} == {**printer, "score": 0, "scores": {}}
    assert single["scores"] == pytest.approx(printer["scores"], abs=1e-4)


def test_low_confidence_escalates_and_readiness_waits_for_the_model(
    classifier_model_dir: Path,
    classifier_probabilities: dict[str, dict[str, float]],
    tmp_path: Path,
) -> None:
    # The trained model is fairly sure of the printer text, but not 99% sure.
    printer_score = max(classifier_probabilities[PRINTER_TEXT].values())
    assert 0.5 < printer_score < 0.99, printer_score
    server = start_server(
        classifier_model_dir,
        tmp_path,
        "--escalation-threshold",
        "0.99",
        "--load-delay",
        "1",
        wait_ready=False,
    )
    try:
        # Listening, model not loaded yet: not ready, and classify says so.
        r = httpx.get(f"{server.url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert_error(post(server, "/v1/classify", {"text": PRINTER_TEXT}), 503, None, "loading")
        _poll(f"{server.url}/readyz", 200, server.proc)
        body = post(server, "/v1/classify", {"text": [PRINTER_TEXT, ESCALATE_TEXT]}).json()
        printer, escalate = body["results"]
        assert printer["label"] == "printer" and printer["score"] == pytest.approx(printer_score)
        assert printer["escalate"] is True and printer["escalation_reason"] == "low_confidence"
        assert escalate["escalation_reason"] == "escalation_label"
    finally:
        stop_server(server)


def test_classify_micro_batches_concurrent_requests(classifier_server: Server) -> None:
    texts = [PRINTER_TEXT if i % 2 else WIFI_TEXT for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        responses = list(
            pool.map(lambda t: post(classifier_server, "/v1/classify", {"text": t}), texts)
        )
    assert all(r.status_code == 200 for r in responses)
    # Each answer belongs to its own request, batched or not.
    labels = [r.json()["results"][0]["label"] for r in responses]
    assert labels == ["printer" if i % 2 else "network" for i in range(24)]
    metrics = httpx.get(f"{classifier_server.url}/metrics").text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("kubetune_serve_batch_size_")
    }
    # Fewer forward passes than texts: concurrent requests shared batches.
    assert values["kubetune_serve_batch_size_count"] < values["kubetune_serve_batch_size_sum"]


@pytest.mark.parametrize(
    ("body", "param", "text"),
    [
        ({}, "text", "required"),
        ({"text": 5}, "text", ""),
        ({"text": None}, "text", ""),
        ({"text": []}, "text", "empty"),
        ({"text": ""}, "text", "empty"),
        ({"text": ["ok", "  "]}, "text", "whitespace"),
        ({"text": ["a", 1]}, "text[1]", "string"),
        ({"text": "a", "labels": []}, "labels", "unknown field"),
        ({"text": "a", "model": "other"}, "model", "does not exist"),
    ],
)
def test_classify_bad_requests(classifier_server: Server, body: Any, param: str, text: str) -> None:
    r = post(classifier_server, "/v1/classify", body)
    assert_error(r, 404 if param == "model" else 400, param, text)


def test_classify_malformed_and_oversized_bodies(classifier_server: Server) -> None:
    url = f"{classifier_server.url}/v1/classify"
    # `curl -d '{...}'` sends application/x-www-form-urlencoded; every endpoint takes JSON.
    form = {"content-type": "application/x-www-form-urlencoded"}
    ok = httpx.post(url, content=b'{"text": "printer jammed again"}', headers=form)
    assert ok.status_code == 200 and ok.json()["results"][0]["label"] == "printer"
    assert_error(httpx.post(url, content=b"", headers=form), 400, "text", "body is empty")
    assert_error(httpx.post(url, content=b'{"text": ', headers=form), 400, None, "not valid JSON")
    # Over the 4 KiB limit this server was started with.
    big = json.dumps({"text": ["my wifi is down"] * 400}).encode()
    assert_error(httpx.post(url, content=big, headers=form), 413, None, "larger than")


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
            # Probes are never limited: the saturated server is still ready.
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


# ------------------------------------------------------------------------------ lifecycle


def _wait_refused(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll ``url`` until the connection is refused (the listener is closed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
        except httpx.ConnectError:
            return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} still accepted connections after {timeout} s")


def test_readiness_and_sigterm_drain(causal_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(
        causal_model_dir,
        tmp_path,
        "--load-delay",
        "1",
        "--shutdown-delay",
        "1",
        "--max-tokens-limit",
        "400",
        wait_ready=False,
    )
    try:
        # Listening (healthz answered) but the model is not loaded yet.
        r = httpx.get(f"{server.url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert_error(post(server, "/v1/chat/completions", {"messages": CHAT}), 503, None, "loading")
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["ready"] is False
        _poll(f"{server.url}/readyz", 200, server.proc)
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["ready"] is True

        # Several long generations in flight (together they take seconds, far longer than the
        # one-second --shutdown-delay) when SIGTERM arrives.
        req = {
            "messages": CHAT,
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        n = 6
        first_event = [threading.Event() for _ in range(n)]
        outcome: list[Any] = [None] * n

        def stream(i: int) -> None:
            try:
                with httpx.stream(
                    "POST", f"{server.url}/v1/chat/completions", json=req, timeout=120
                ) as resp:
                    assert resp.status_code == 200, resp.read()
                    lines = resp.iter_lines()
                    first = next(lines)
                    first_event[i].set()
                    outcome[i] = sse_events(iter([first, *lines]))
            except BaseException as exc:  # reported by the main thread
                outcome[i] = exc
            finally:
                first_event[i].set()

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(n)]
        for thread in threads:
            thread.start()
        for event in first_event:
            assert event.wait(60), "a generation did not start"
        assert not any(isinstance(o, BaseException) for o in outcome), outcome
        server.proc.send_signal(signal.SIGTERM)
        # Readiness flips at once, while the listener stays up for --shutdown-delay.
        draining = _poll(f"{server.url}/readyz", 503, server.proc, timeout=5)
        assert draining.json()["status"] == "draining"
        # Then the listener closes, with the generations still streaming: this is the drain.
        _wait_refused(f"{server.url}/healthz", server.proc, timeout=30)
        in_flight = sum(thread.is_alive() for thread in threads)
        assert in_flight > 0, "every generation ended before the listener closed"
        for thread in threads:
            thread.join(timeout=120)
        # Each in-flight request was finished in full, not cut off.
        for events in outcome:
            assert not isinstance(events, BaseException), events
            assert events[-1] == "[DONE]"
            usage = events[-2]["usage"]
            finish = events[-3]["choices"][0]["finish_reason"]
            assert finish == "stop" or usage["completion_tokens"] == 400, events[-3:]
            streamed = "".join(
                c["choices"][0]["delta"].get("content", "") for c in events[:-1] if c["choices"]
            )
            assert streamed
        assert server.proc.wait(timeout=60) == 0, server.output()
        assert "Waiting for connections to close" in server.output()
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
