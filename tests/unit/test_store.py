"""Store: LocalStore and S3Store (against a moto server on loopback) through the same tests."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.store import (
    LocalStore,
    S3Store,
    StorageUnavailable,
    Store,
    StoreError,
    StoreNotFound,
    download_tree,
    open_store,
)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "local":
        yield open_store(str(tmp_path / "store"))
    else:
        endpoint = request.getfixturevalue("moto_server")
        bucket = request.getfixturevalue("s3_bucket")
        yield open_store(f"s3://{bucket}/runs/job", endpoint=endpoint)


def test_read_write_roundtrip(store: Store) -> None:
    store.write_bytes("a/b.bin", b"\x00\x01hello")
    assert store.read_bytes("a/b.bin") == b"\x00\x01hello"
    store.write_bytes("a/b.bin", b"new")  # overwrite
    assert store.read_bytes("/a/b.bin") == b"new"
    store.write_json("doc.json", {"step": 3, "ok": True})
    assert store.read_json("doc.json") == {"step": 3, "ok": True}
    assert store.exists("doc.json")
    assert not store.exists("nope.json")
    assert not store.exists("a")  # a folder is not an object


def test_not_found(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreNotFound):
        store.read_bytes("missing/key")
    with pytest.raises(StoreNotFound):
        store.read_json("missing.json")
    with pytest.raises(StoreNotFound):
        store.download_file("missing.bin", tmp_path / "out.bin")
    with pytest.raises(StoreNotFound):
        store.download_dir("missing-dir", tmp_path / "out")
    assert store.list("missing-dir") == []
    assert store.delete_prefix("missing-dir") == 0


def test_list_and_child(store: Store) -> None:
    for key in [
        "checkpoints/step-1/a",
        "checkpoints/step-1/.done-rank-0",
        "checkpoints/latest",
        "checkpoints-old/x",
        "top.json",
    ]:
        store.write_bytes(key, b"x")
    assert store.list() == sorted(
        [
            "checkpoints-old/x",
            "checkpoints/latest",
            "checkpoints/step-1/.done-rank-0",
            "checkpoints/step-1/a",
            "top.json",
        ]
    )
    # Keys come back relative to the folder asked for; sibling prefixes do not leak in.
    assert store.list("checkpoints") == ["latest", "step-1/.done-rank-0", "step-1/a"]
    assert store.list("checkpoints/") == store.list("checkpoints")
    child = store.child("checkpoints")
    assert child.uri == f"{store.uri}/checkpoints"
    assert child.read_bytes("latest") == b"x"
    assert child.list("step-1") == [".done-rank-0", "a"]


def test_delete_prefix(store: Store) -> None:
    for key in ["ck/step-1/a", "ck/step-1/b/c", "ck/step-10/a", "ck/step-2/a"]:
        store.write_bytes(key, b"x")
    assert store.delete_prefix("ck/step-1") == 2  # not step-10
    assert store.list("ck") == ["step-10/a", "step-2/a"]
    assert store.delete_prefix("ck/step-2/a") == 1  # a single object
    assert store.list("ck") == ["step-10/a"]


def test_dirs_roundtrip(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(os.urandom(1000))
    assert store.upload_dir(src, "model") == 1002
    assert store.list("model") == ["config.json", "sub/weights.bin"]
    out = store.download_dir("model", tmp_path / "out")
    assert (out / "sub" / "weights.bin").read_bytes() == (src / "sub" / "weights.bin").read_bytes()
    one = store.download_file("model/config.json", tmp_path / "x" / "c.json")
    assert one.read_text() == "{}"
    # download_tree goes through the URI, as the inference server does for --model s3://...
    dest = download_tree(f"{store.uri}/model", tmp_path / "tree", endpoint=_endpoint(store))
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == ["config.json", "weights.bin"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".kubetune-tmp")]


def _endpoint(store: Store) -> str | None:
    if isinstance(store, S3Store):
        return str(store.client.meta.endpoint_url)
    return None


def test_multipart_upload_roundtrip(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.mkdir()
    data = os.urandom(20 * 1024 * 1024)  # > 8 MiB threshold: three 8 MiB parts on S3
    (src / "weights.bin").write_bytes(data)
    (src / "small.txt").write_text("hi")
    assert store.upload_dir(src, "ckpt") == len(data) + 2
    if isinstance(store, S3Store):
        head = store.client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/ckpt/weights.bin")
        assert "-" in head["ETag"]  # multipart ETags look like "<md5>-<parts>"
    out = store.download_dir("ckpt", tmp_path / "back")
    assert (out / "weights.bin").read_bytes() == data


def test_local_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = open_store("runs/x")
    assert rel.local_path() == tmp_path / "runs" / "x"
    assert open_store(f"file://{tmp_path}/y").local_path() == tmp_path / "y"
    with pytest.raises(StoreError, match="not supported"):
        open_store("gs://bucket/x")
    store = LocalStore(tmp_path / "s")
    with pytest.raises(StoreError, match=r"\.\."):
        store.read_bytes("../escape")
    store.write_bytes("a.json", b"{")
    with pytest.raises(StoreError, match="not valid JSON"):
        store.read_json("a.json")
    # Atomic writes leave no temp files behind.
    assert store.list() == ["a.json"]


def test_upload_dir_into_itself_is_a_noop(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"abc")
    assert store.upload_dir(tmp_path / "model", "model") == 3
    assert (tmp_path / "model" / "w.bin").read_bytes() == b"abc"


def test_s3_uri_and_prefixes(moto_server: str, s3_bucket: str) -> None:
    root = open_store(f"s3://{s3_bucket}", endpoint=moto_server)
    assert root.uri == f"s3://{s3_bucket}" and root.local_path() is None
    root.write_bytes("a/b/c.txt", b"1")
    assert open_store(f"s3://{s3_bucket}/a/", endpoint=moto_server).read_bytes("b/c.txt") == b"1"
    assert root.child("a").child("b").uri == f"s3://{s3_bucket}/a/b"


def test_s3_endpoint_from_env(
    moto_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    store = open_store(f"s3://{s3_bucket}/p")
    store.write_bytes("k", b"v")
    assert store.read_bytes("k") == b"v"


def test_s3_missing_bucket_is_a_clear_error(moto_server: str) -> None:
    store = open_store("s3://kt-no-such-bucket/x", endpoint=moto_server)
    with pytest.raises(StoreError, match="kt-no-such-bucket") as info:
        store.write_bytes("k", b"v")
    assert not isinstance(info.value, StorageUnavailable | StoreNotFound)
    assert "does not exist" in str(info.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_s3_unreachable_endpoint_raises_unavailable(tmp_path: Path, moto_server: str) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = open_store(
        "s3://bucket/p", endpoint=endpoint, max_attempts=2, connect_timeout=1, read_timeout=2
    )
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="unavailable"):
        store.read_bytes("k")
    with pytest.raises(StorageUnavailable):
        store.write_json("k", {})
    with pytest.raises(StorageUnavailable):
        store.list()
    src = tmp_path / "d"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    with pytest.raises(StorageUnavailable):
        store.upload_dir(src, "up")
    assert time.monotonic() - started < 30


def test_s3_server_errors_map_to_unavailable() -> None:
    from botocore.exceptions import ClientError

    from kubetune_trainer.store import _map_boto_error

    def err(code: str, status: int) -> ClientError:
        response: Any = {
            "Error": {"Code": code, "Message": "m"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }
        return ClientError(response, "GetObject")

    assert isinstance(_map_boto_error(err("SlowDown", 503), "b", "k"), StorageUnavailable)
    assert isinstance(_map_boto_error(err("InternalError", 500), "b", "k"), StorageUnavailable)
    assert isinstance(_map_boto_error(err("NoSuchKey", 404), "b", "k"), StoreNotFound)
    denied = _map_boto_error(err("AccessDenied", 403), "b", "k")
    assert type(denied) is StoreError and "s3://b/k" in str(denied)
    assert _map_boto_error(ValueError("x"), "b", "k") is None
