"""Data preparation: loading, validation errors, cleaning, PII redaction, splits, fingerprints."""

from __future__ import annotations

import json
import pickle
import re
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.config import DataSpec
from kubetune_trainer.data import (
    InvalidDataError,
    load_rows,
    luhn_ok,
    prepare_data,
    redact_pii,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
CLS = "sequence-classification"
LM = "causal-lm"


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cls_rows(n: int = 20) -> list[dict[str, Any]]:
    return [{"text": f"ticket number {i}", "label": "a" if i % 2 else "b"} for i in range(n)]


def spec(train: Path | str, fmt: str = "classification", **kw: Any) -> DataSpec:
    return DataSpec.model_validate({"train": str(train), "format": fmt, **kw})


def bad(
    data_spec: DataSpec, task: str = CLS, *, line: int | None, field: str | None, match: str
) -> InvalidDataError:
    with pytest.raises(InvalidDataError) as info:
        prepare_data(data_spec, task, seed=0)
    err = info.value
    msg = str(err)
    assert Path(data_spec.train).name in msg or (err.source and err.source in msg)
    if line is not None:
        assert err.line == line and f"line {line}" in msg, msg
    if field is not None:
        assert err.field == field and repr(field) in msg, msg
    assert re.search(match, msg), msg
    return err


# -- bad data -------------------------------------------------------------------------------------


def test_missing_field(tmp_path: Path) -> None:
    rows = cls_rows(5)
    del rows[2]["label"]
    bad(spec(jsonl(tmp_path / "t.jsonl", rows)), line=3, field="label", match="missing field")


def test_custom_field_names(tmp_path: Path) -> None:
    rows = [{"body": f"x {i}", "intent": "a" if i % 2 else "b"} for i in range(10)]
    path = jsonl(tmp_path / "t.jsonl", rows)
    data = prepare_data(spec(path, fields={"text": "body", "label": "intent"}), CLS, seed=0)
    assert set(data.train[0]) == {"text", "label"} and data.labels == ["a", "b"]
    bad(spec(path), line=1, field="text", match="missing field 'text'")


@pytest.mark.parametrize(
    ("row", "field", "match"),
    [
        ({"text": 5, "label": "a"}, "text", "expected a string, got a number"),
        ({"text": "x", "label": 1.5}, "label", "string or integer"),
        ({"text": "x", "label": True}, "label", "string or integer"),
        ({"text": "x", "label": ["a"]}, "label", "got a list"),
        ({"text": "x", "label": ""}, "label", "label is empty"),
    ],
)
def test_wrong_types_classification(
    tmp_path: Path, row: dict[str, Any], field: str, match: str
) -> None:
    path = jsonl(tmp_path / "t.jsonl", [*cls_rows(3), row])
    bad(spec(path), line=4, field=field, match=match)


ASSISTANT = {"role": "assistant", "content": "ok"}


@pytest.mark.parametrize(
    ("row", "field", "match"),
    [
        ({"messages": "hi"}, "messages", "expected a list of messages, got a string"),
        ({"messages": []}, "messages", "empty"),
        ({"messages": ["hi"]}, "messages[0]", "expected an object"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "system, user"),
        ({"messages": [{"content": "x"}, ASSISTANT]}, "messages[0].role", "missing"),
        (
            {"messages": [{"role": "user", "content": 3}, ASSISTANT]},
            "messages[0].content",
            "expected a string, got a number",
        ),
        ({"messages": [ASSISTANT, {"role": "user"}]}, "messages[1].content", "got missing"),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages", "no assistant message"),
        ({"msgs": []}, "messages", "missing field"),
    ],
)
def test_bad_chat_rows(tmp_path: Path, row: dict[str, Any], field: str, match: str) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, ASSISTANT]}
    path = jsonl(tmp_path / "chat.jsonl", [good, row])
    bad(spec(path, "chat"), LM, line=2, field=field, match=match)


def test_bad_instruction_and_text_rows(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "i.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p"}])
    bad(spec(path, "instruction"), LM, line=2, field="completion", match="missing field")
    path = jsonl(tmp_path / "x.jsonl", [{"text": "a"}, {"text": None}])
    bad(spec(path, "text"), LM, line=2, field="text", match="missing field")
    path = jsonl(tmp_path / "y.jsonl", [{"text": "a"}, ["not", "an", "object"]])
    bad(spec(path, "text"), LM, line=2, field=None, match="expected a JSON object, got a list")


def test_unknown_label_with_given_labels(tmp_path: Path) -> None:
    rows = [*cls_rows(4), {"text": "x", "label": "zebra"}]
    err = bad(
        spec(jsonl(tmp_path / "t.jsonl", rows), labels=["a", "b"]),
        line=5,
        field="label",
        match="'zebra' is not one of the accepted labels: 'a', 'b'",
    )
    assert err.reason.startswith("label")


def test_validation_label_not_in_train(tmp_path: Path) -> None:
    train = jsonl(tmp_path / "train.jsonl", cls_rows(6))
    val = jsonl(
        tmp_path / "val.jsonl", [{"text": "v1", "label": "a"}, {"text": "v2", "label": "c"}]
    )
    with pytest.raises(InvalidDataError) as info:
        prepare_data(spec(train, validation=str(val)), CLS, seed=0)
    assert info.value.line == 2 and info.value.field == "label"
    assert "val.jsonl" in str(info.value) and "'c'" in str(info.value)


def test_one_class(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "a"} for i in range(5)]
    bad(spec(jsonl(tmp_path / "t.jsonl", rows)), line=None, field="label", match="one-class data")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text("\n  \n")
    bad(spec(tmp_path / "t.jsonl"), line=None, field=None, match="no rows")
    (tmp_path / "e.csv").write_text("text,label\n")
    bad(spec(tmp_path / "e.csv"), line=None, field=None, match="no rows")


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    bad(spec(path), line=2, field=None, match="invalid UTF-8")


def test_truncated_json(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "ok2", "label": "b"}\n{"text": "tru')
    bad(spec(path), line=3, field=None, match=r"invalid JSON \(Unterminated string.*column")


def test_binary_garbage(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    bad(spec(path), line=1, field=None, match="invalid (UTF-8|JSON)")
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1 definitely not parquet")
    bad(spec(path), line=None, field=None, match="Parquet")


def test_csv_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,category\nhello,a\n")
    bad(spec(path), line=1, field="label", match="header .* has no column 'label'.*text, category")


def test_csv_short_row_and_long_row(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,label\nhello,a\nworld\n")
    bad(spec(path), line=3, field="label", match="missing field")
    path.write_text("text,label\nhello,a\nworld,b,extra\n")
    bad(spec(path), line=3, field=None, match="3 values but the header has 2")


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("x")
    bad(spec(path), line=None, field=None, match="unsupported file extension '.txt'")
    bad(spec(tmp_path / "nope.jsonl"), line=None, field=None, match="no such file")
    with pytest.raises(InvalidDataError, match="no rows"):
        (tmp_path / "empty.jsonl").write_text("")
        load_rows(str(tmp_path / "empty.jsonl"))


def test_error_is_a_value_error_with_parts(tmp_path: Path) -> None:
    err = InvalidDataError("expected a string", source="s3://b/k.jsonl", line=7, field="text")
    assert isinstance(err, ValueError)
    assert str(err) == "s3://b/k.jsonl, line 7, field 'text': expected a string"
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.source, back.line, back.field) == (str(err), err.source, 7, "text")
    assert str(InvalidDataError("no source")) == "no source"


# -- loading --------------------------------------------------------------------------------------


def test_csv_and_parquet_load_like_jsonl(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = cls_rows(10)
    rows[3]["text"] = 'quoted, "comma"\nand a newline'
    j = jsonl(tmp_path / "t.jsonl", rows)
    c = tmp_path / "t.csv"
    import csv

    with c.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    p = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    js = tmp_path / "t.json"
    js.write_text(json.dumps(rows))
    prepared = [prepare_data(spec(f), CLS, seed=3) for f in (j, c, p, js)]
    assert len({d.report.fingerprint for d in prepared}) == 1
    # Line numbers in CSV count physical lines: row 5 sits after the 2-line quoted field.
    assert [line for line, _ in load_rows(str(c))][3:5] == [5, 7]
    assert [line for line, _ in load_rows(str(p))][:3] == [1, 2, 3]


def test_parquet_and_csv_chat(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    pq.write_table(pa.Table.from_pylist([{"messages": msgs}]), tmp_path / "c.parquet")
    data = prepare_data(spec(tmp_path / "c.parquet", "chat"), LM, seed=0)
    assert data.train == [{"messages": msgs}]
    # CSV carries the message list as a JSON string.
    (tmp_path / "c.csv").write_text('messages\n"' + json.dumps(msgs).replace('"', '""') + '"\n')
    assert prepare_data(spec(tmp_path / "c.csv", "chat"), LM, seed=0).train == [{"messages": msgs}]
    (tmp_path / "d.csv").write_text("messages\nnot json\n")
    bad(spec(tmp_path / "d.csv", "chat"), LM, line=2, field="messages", match="invalid JSON")


def test_relative_paths_use_base_dir(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    jsonl(tmp_path / "data" / "t.jsonl", cls_rows(10))
    data = prepare_data(spec("data/t.jsonl"), CLS, seed=0, base_dir=tmp_path)
    assert data.report.rows_read == {"train": 10}


def test_s3_loading(tmp_path: Path, moto_server: str, s3_bucket: str) -> None:
    import boto3

    s3 = boto3.session.Session().client("s3", endpoint_url=moto_server)
    body = "".join(json.dumps(r) + "\n" for r in cls_rows(10))
    s3.put_object(Bucket=s3_bucket, Key="data/train.jsonl", Body=body.encode())
    s3.put_object(Bucket=s3_bucket, Key="data/bad.jsonl", Body=b'{"text": 1, "label": "a"}\n')
    uri = f"s3://{s3_bucket}/data/train.jsonl"
    assert len(load_rows(uri, endpoint=moto_server)) == 10
    data = prepare_data(spec(uri), CLS, seed=0, endpoint=moto_server)
    assert data.report.rows_read == {"train": 10}
    local = prepare_data(spec(jsonl(tmp_path / "train.jsonl", cls_rows(10))), CLS, seed=0)
    assert local.report.fingerprint == data.report.fingerprint
    bad_uri = f"s3://{s3_bucket}/data/bad.jsonl"
    with pytest.raises(InvalidDataError) as info:
        prepare_data(spec(bad_uri), CLS, seed=0, endpoint=moto_server)
    assert str(info.value).startswith(f"{bad_uri}, line 1, field 'text'")
    with pytest.raises(InvalidDataError, match="no such object"):
        load_rows(f"s3://{s3_bucket}/data/missing.jsonl", endpoint=moto_server)


# -- cleaning and dedupe --------------------------------------------------------------------------


def test_cleaning_counts(tmp_path: Path) -> None:
    rows = [
        {"text": "  hello\x00 \x07world  ", "label": "a"},
        {"text": "hello   world", "label": "a"},  # duplicate after cleaning
        {"text": "\x01\x02  ", "label": "b"},  # empty after cleaning
        {"text": "line one  \r\n\n\n\n    indented\tcode", "label": "b"},
        {"text": "other", "label": "b"},
    ]
    data = prepare_data(spec(jsonl(tmp_path / "t.jsonl", rows), validation_split=0), CLS, seed=0)
    r = data.report
    assert (r.rows_read, r.dropped_empty, r.dropped_duplicates) == ({"train": 5}, 1, 1)
    assert r.control_chars_removed == 3  # \x00 \x07 \r (the dropped rows do not count)
    texts = sorted(row["text"] for row in data.train)
    assert texts == ["hello world", "line one\n\n    indented code", "other"]


def test_cleaning_disabled_keeps_everything(tmp_path: Path) -> None:
    rows = [
        {"text": " a ", "label": "a"},
        {"text": " a ", "label": "a"},
        {"text": "", "label": "b"},
    ]
    s = spec(jsonl(tmp_path / "t.jsonl", rows), validation_split=0, cleaning={"enabled": False})
    data = prepare_data(s, CLS, seed=0)
    assert sorted(r["text"] for r in data.train) == ["", " a ", " a "]
    assert data.report.dropped_duplicates == data.report.dropped_empty == 0


def test_cross_split_duplicates_dropped(tmp_path: Path) -> None:
    train = jsonl(tmp_path / "train.jsonl", cls_rows(10))
    val = jsonl(tmp_path / "val.jsonl", [*cls_rows(3), {"text": "fresh", "label": "a"}])
    test = jsonl(tmp_path / "test.jsonl", [{"text": "ticket  number 1", "label": "a"}])
    data = prepare_data(spec(train, validation=str(val), test=str(test)), CLS, seed=0)
    assert data.validation == [{"text": "fresh", "label": 0}]
    assert data.test == []
    assert data.report.dropped_duplicates == 4
    assert data.report.split_sizes == {"train": 10, "validation": 1, "test": 0}


def test_chat_cleaning_and_empty(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": " hi\x00 "},
                {"role": "assistant", "content": "yo"},
            ]
        },
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \x03"}]},
        {
            "messages": [
                {"role": "user", "content": "hi", "name": "x"},
                {"role": "assistant", "content": "yo"},
            ]
        },
    ]
    data = prepare_data(spec(jsonl(tmp_path / "c.jsonl", rows), "chat"), LM, seed=0)
    assert data.report.dropped_empty == 1 and data.report.dropped_duplicates == 1
    assert data.train == [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    assert data.validation == []  # one row: nothing to carve off
    assert data.labels is None and data.report.label_counts is None


def test_million_duplicated_rows(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        f.write('{"text": "hello   world", "label": "a"}\n' * 1_000_000)
        f.write('{"text": "bye", "label": "b"}\n{"text": "ciao", "label": "b"}\n')
        f.write('{"text": "hello world", "label": "a"}\n')  # a duplicate only after cleaning
    started = time.monotonic()
    data = prepare_data(spec(path, validation_split=0), CLS, seed=0)
    elapsed = time.monotonic() - started
    print(f"1M duplicated rows prepared in {elapsed:.1f}s")
    assert data.report.rows_read == {"train": 1_000_003}
    assert data.report.dropped_duplicates == 1_000_000
    assert len(data.train) == 3


# -- splits and fingerprints ----------------------------------------------------------------------


def test_splits_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "t.jsonl", cls_rows(100))
    s = spec(path, validation_split=0.2, test_split=0.1)
    a = prepare_data(s, CLS, seed=7)
    b = prepare_data(s, CLS, seed=7)
    c = prepare_data(s, CLS, seed=8)
    assert a.report.split_sizes == {"train": 70, "validation": 20, "test": 10}
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)
    assert a.report.fingerprint == b.report.fingerprint
    assert a.validation != c.validation and a.report.fingerprint != c.report.fingerprint
    texts = [r["text"] for r in a.train + a.validation + a.test]
    assert len(set(texts)) == 100
    assert a.report.label_counts is not None
    assert sum(a.report.label_counts["validation"].values()) == 20


def test_no_validation_when_split_zero(tmp_path: Path) -> None:
    data = prepare_data(
        spec(jsonl(tmp_path / "t.jsonl", cls_rows(10)), validation_split=0), CLS, seed=0
    )
    assert data.validation == [] and data.test == [] and len(data.train) == 10


def test_max_samples_caps_train(tmp_path: Path) -> None:
    s = spec(jsonl(tmp_path / "t.jsonl", cls_rows(50)), validation_split=0.1, max_samples=5)
    data = prepare_data(s, CLS, seed=0)
    assert data.report.split_sizes == {"train": 5, "validation": 5, "test": 0}
    assert prepare_data(s, CLS, seed=0).train == data.train


def test_labels_order_and_ids(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([10, 2, 2, 10, 1])]
    data = prepare_data(spec(jsonl(tmp_path / "t.jsonl", rows), validation_split=0), CLS, seed=0)
    assert data.labels == ["1", "2", "10"]  # numeric labels sort numerically
    by_text = {r["text"]: r["label"] for r in data.train}
    assert by_text == {"t0": 2, "t1": 1, "t2": 1, "t3": 2, "t4": 0}
    given = prepare_data(
        spec(tmp_path / "t.jsonl", validation_split=0, labels=["10", "2", "1", "unused"]),
        CLS,
        seed=0,
    )
    assert given.labels == ["10", "2", "1", "unused"]
    assert {r["text"]: r["label"] for r in given.train}["t0"] == 0


def test_fingerprint_changes_with_one_row(tmp_path: Path) -> None:
    rows = cls_rows(30)
    a = prepare_data(spec(jsonl(tmp_path / "a.jsonl", rows)), CLS, seed=1)
    rows[17]["text"] += "!"
    b = prepare_data(spec(jsonl(tmp_path / "b.jsonl", rows)), CLS, seed=1)
    assert a.report.fingerprint.startswith("sha256:") and len(a.report.fingerprint) == 71
    assert a.report.fingerprint != b.report.fingerprint
    json.dumps(a.report.to_dict())  # serialisable for the run summary


def test_pii_redaction_in_prepared_rows(tmp_path: Path) -> None:
    rows = [
        {"prompt": "mail me at a.b@example.com", "completion": "calling +1 415-555-0132"},
        {"prompt": "server 10.0.0.1", "completion": "card 4111 1111 1111 1111"},
    ]
    s = spec(
        jsonl(tmp_path / "i.jsonl", rows),
        "instruction",
        validation_split=0,
        pii_redaction={"enabled": True, "kinds": ["email", "phone", "credit_card"]},
    )
    data = prepare_data(s, LM, seed=0)
    got = sorted(data.train, key=lambda r: r["prompt"])
    assert got == [
        {"prompt": "mail me at <EMAIL>", "completion": "calling <PHONE>"},
        {"prompt": "server 10.0.0.1", "completion": "card <CREDIT_CARD>"},
    ]
    assert data.report.pii_redacted == {"email": 1, "phone": 1, "credit_card": 1}


# -- PII patterns ---------------------------------------------------------------------------------

ALL = ["email", "phone", "ipv4", "ipv6", "credit_card"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to john.doe+tag@example.co.uk today", "write to <EMAIL> today"),
        ("a@b.io.", "<EMAIL>."),
        ("call +1 415-555-0132 now", "call <PHONE> now"),
        ("call (212) 555-0187", "call <PHONE>"),
        ("call 415.555.0132.", "call <PHONE>."),
        ("uk: +44 20 7946 0958", "uk: <PHONE>"),
        ("de +49 30 901820", "de <PHONE>"),
        ("toll free 1-800-555-0199", "toll free <PHONE>"),
        ("local 555-0123 ok", "local <PHONE> ok"),
        ("host 192.168.0.254.", "host <IPV4>."),
        ("10.0.12.201/24", "<IPV4>/24"),
        ("v6 2001:db8::1 up", "v6 <IPV6> up"),
        ("fe80::1ff:fe23:4567:890a", "<IPV6>"),
        ("2001:db8:85a3::8a2e:370:7334,", "<IPV6>,"),
        ("2001:0db8:0000:0000:0000:ff00:0042:8329", "<IPV6>"),
        ("loopback ::1", "loopback <IPV6>"),
        ("mapped ::ffff:192.168.1.1", "mapped <IPV6>"),
        ("card 4111 1111 1111 1111", "card <CREDIT_CARD>"),
        ("card 5555-5555-5555-4444 ok", "card <CREDIT_CARD> ok"),
        ("amex 378282246310005", "amex <CREDIT_CARD>"),
        ("4242 4242 4242 4242 123", "<CREDIT_CARD> 123"),
    ],
)
def test_pii_positives(text: str, expected: str) -> None:
    out, counts = redact_pii(text, ALL)
    assert out == expected
    assert sum(counts.values()) == expected.count("<")


@pytest.mark.parametrize(
    "text",
    [
        "in 2023 we shipped version 10.2.3",
        "see ticket #12345 and INV-40367",
        "order 1234567890 and 12345678",
        "meeting at 10:30 or 12:30:00",
        "date 2024-01-15, range 100-2000",
        "std::vector and Face::add",
        "MAC 00:1A:2B:3C:4D:5E",
        "not an ip 256.1.1.1 nor 1.2.3.4.5 nor 01.02.03.04",
        "luhn fails 4111 1111 1111 1112",
        "user@localhost has no domain",
        "3+4=7, score +10, C++ 17",
        "price £18.50, 45 minutes, 3 seats",
    ],
)
def test_pii_negatives(text: str) -> None:
    assert redact_pii(text, ALL) == (text, {})


def test_phone_does_not_eat_ipv4_when_ipv4_is_off() -> None:
    text = "ip 192.168.100.200 and 10.20.30.40"
    assert redact_pii(text, ["phone"]) == (text, {})
    assert redact_pii(text, ["ipv4"])[1] == {"ipv4": 2}


def test_only_requested_kinds() -> None:
    text = "a@b.com 10.0.0.1"
    assert redact_pii(text, ["ipv4"]) == ("a@b.com <IPV4>", {"ipv4": 1})
    with pytest.raises(ValueError, match="unknown PII kinds"):
        redact_pii(text, ["ssn"])


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005")
    assert not luhn_ok("4111111111111112")


# -- bundled examples -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt", "task"),
    [("support-intents", "classification", CLS), ("support-chat", "chat", LM)],
)
def test_bundled_examples_prepare_cleanly(name: str, fmt: str, task: str) -> None:
    d = EXAMPLES / name
    s = spec(
        d / "train.jsonl",
        fmt,
        validation=str(d / "validation.jsonl"),
        test=str(d / "test.jsonl"),
        pii_redaction={"enabled": True},
    )
    data = prepare_data(s, task, seed=42)
    report = data.report
    print(name, json.dumps(report.to_dict(), indent=1))
    assert report.dropped_empty == report.dropped_duplicates == 0
    assert report.split_sizes == report.rows_read
    if fmt == "classification":
        assert data.labels is not None and len(data.labels) == 7
        assert sum(report.pii_redacted.values()) > 0
        joined = " ".join(r["text"] for r in data.train + data.validation + data.test)
        assert "@" not in joined and "4111 1111" not in joined


def test_bundled_instructions_prepare_cleanly() -> None:
    data = prepare_data(spec(EXAMPLES / "instructions.jsonl", "instruction"), LM, seed=0)
    assert data.train and set(data.train[0]) == {"prompt", "completion"}
