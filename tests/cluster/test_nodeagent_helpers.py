"""Fast unit tests of the node agent's pure helpers (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

from tests.cluster.nodeagent import HostsFile, exit_code, expand, rewrite_paths


def test_expand_like_kubelet() -> None:
    env = {"A": "1", "POD_IP": "127.0.1.2"}
    assert expand("--bind=$(POD_IP)", env) == "--bind=127.0.1.2"
    assert expand("$$(A) $(A) $(MISSING)", env) == "$(A) 1 $(MISSING)"


def test_rewrite_paths_prefix_only() -> None:
    mounts = [("/etc/config/sub", "/p/sub"), ("/etc/config", "/p/cfg"), ("/data", "/p/data")]
    assert rewrite_paths("/etc/config/a.yaml", mounts) == "/p/cfg/a.yaml"
    assert rewrite_paths("--cfg=/etc/config", mounts) == "--cfg=/p/cfg"
    assert rewrite_paths("/etc/config/sub/x", mounts) == "/p/sub/x"
    assert rewrite_paths("open('/data/x')", mounts) == "open('/p/data/x')"
    assert rewrite_paths("/mnt/data/x /database /etc/configs", mounts) == (
        "/mnt/data/x /database /etc/configs"
    )


def test_exit_code_of_signals() -> None:
    assert exit_code(-9) == 137
    assert exit_code(-15) == 143
    assert exit_code(3) == 3


def test_hosts_file_keeps_foreign_lines(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n# mine\n10.0.0.1 other\n")
    a = HostsFile(str(hosts), "a")
    b = HostsFile(str(hosts), "b")
    a.set([("127.0.1.2", ["x.sub", "x.sub.ns.svc"])])
    b.set([("127.0.2.2", ["y"])])
    text = hosts.read_text()
    assert "127.0.1.2\tx.sub x.sub.ns.svc" in text and "127.0.2.2\ty" in text
    a.set([])
    assert hosts.read_text() == (
        "127.0.0.1 localhost\n# mine\n10.0.0.1 other\n"
        "# BEGIN kubetune-nodeagent b\n127.0.2.2\ty\n# END kubetune-nodeagent b\n"
    )
