"""How ``roadstream run`` sizes its private Redis: the memory it may use (cgroups v1 and v2,
nested), and the bounds the private server records."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from stream.settings import BrokerSettings
from workers import run as run_module
from workers.cli import cli
from workers.cli.run import register
from workers.run import (
    CGROUP_V1_UNLIMITED,
    available_memory_bytes,
    cgroup_memory_room,
    private_broker,
    private_maxmemory,
    private_redis,
)

GIB = 2**30
V1_NONE = 9223372036854771712  # what cgroup v1 reports when no limit is set


def _tree(tmp_path: Path, cgroup: str, files: dict[str, str], meminfo_gib: int = 64) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {128 * 2**20} kB\nMemAvailable: {meminfo_gib * 2**20} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return proc, root


def test_cgroup_v2_nested_takes_the_smallest_room_along_the_path(tmp_path):
    # Given a v2 process in /a/b: b unlimited, its parent a at 8 GiB with 3 GiB used
    proc, root = _tree(tmp_path, "0::/a/b\n", {
        "cgroup.controllers": "memory", "a/memory.max": str(8 * GIB), "a/memory.current": str(3 * GIB),
        "a/b/memory.max": "max", "a/b/memory.current": str(1 * GIB)})  # fmt: skip
    # Then the parent's limit bounds it, under the machine's 64 GiB
    assert cgroup_memory_room(proc, root) == 5 * GIB
    assert available_memory_bytes(proc, root) == 5 * GIB


def test_cgroup_v2_max_everywhere_is_no_limit(tmp_path):
    proc, root = _tree(tmp_path, "0::/a\n", {"cgroup.controllers": "memory", "a/memory.max": "max",
                                             "a/memory.current": str(GIB)})  # fmt: skip
    assert cgroup_memory_room(proc, root) is None
    assert available_memory_bytes(proc, root) == 64 * GIB


def test_cgroup_v1_nested_limits_and_the_unlimited_value(tmp_path):
    # Given a hybrid host (v1 memory controller, an empty unified line) and a process in
    # /outer/inner: inner at 2 GiB (0.5 used), outer at 1 GiB (0.75 used), the root unlimited
    proc, root = _tree(tmp_path, "4:memory:/outer/inner\n1:cpu,cpuacct:/\n0::/\n", {
        "memory/memory.limit_in_bytes": str(V1_NONE), "memory/memory.usage_in_bytes": str(10 * GIB),
        "memory/outer/memory.limit_in_bytes": str(GIB), "memory/outer/memory.usage_in_bytes": str(3 * GIB // 4),
        "memory/outer/inner/memory.limit_in_bytes": str(2 * GIB),
        "memory/outer/inner/memory.usage_in_bytes": str(GIB // 2)})  # fmt: skip
    # Then the outer limit wins; the huge root value is no limit at all
    assert cgroup_memory_room(proc, root) == GIB // 4
    assert available_memory_bytes(proc, root) == GIB // 4


def test_cgroup_v1_huge_limit_alone_leaves_meminfo(tmp_path):
    assert V1_NONE >= CGROUP_V1_UNLIMITED
    proc, root = _tree(tmp_path, "4:memory:/\n", {"memory/memory.limit_in_bytes": str(V1_NONE),
                                                  "memory/memory.usage_in_bytes": str(GIB)}, meminfo_gib=3)  # fmt: skip
    assert available_memory_bytes(proc, root) == 3 * GIB


def test_a_host_path_missing_under_the_mount_falls_back_to_the_mounted_root(tmp_path):
    # Given a container that sees its host cgroup path but has its own cgroup at the root
    proc, root = _tree(tmp_path, "0::/docker/abc\n", {"cgroup.controllers": "memory",
                                                      "memory.max": str(4 * GIB), "memory.current": str(GIB)})  # fmt: skip
    assert available_memory_bytes(proc, root) == 3 * GIB


def test_nothing_readable_is_none(tmp_path):
    assert available_memory_bytes(tmp_path / "no-proc", tmp_path / "no-cgroup") is None


needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on the PATH")


@needs_redis
def test_the_private_server_records_the_bounds_it_runs_with():
    # Given run's private server started with a blob bound and a used-memory bound
    broker = BrokerSettings(max_blob_bytes=100 * 2**20, max_used_memory=300 * 2**20)
    with private_redis(broker) as url:
        recorded = private_broker(url)
        # Then what it records is what the server itself says
        config = redis.Redis.from_url(url).config_get("*")
        assert recorded is not None and recorded.url == url
        assert recorded.maxmemory == int(config["maxmemory"]) == private_maxmemory(broker)
        assert (recorded.max_blob_bytes, recorded.max_used_memory) == (100 * 2**20, 300 * 2**20)
        assert not recorded.persistence and config["save"] == "" and config["appendonly"] == "no"
    # And once stopped, the URL is nobody's private server any more
    assert private_broker(url) is None


@needs_redis
def test_a_users_own_unix_socket_redis_is_not_called_private(tmp_path, monkeypatch):
    # Given the user's own redis-server on a Unix socket, named with --redis
    socket = tmp_path / "own.sock"
    server = subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--unixsocket", str(socket), "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        url = f"unix://{socket}?db=0"
        assert private_broker(url) is None

        def stops_after_the_broker_line(footage, settings, out_dir, *, url, on_broker, **_):
            on_broker(url)
            raise run_module.RunError("stopped by the test")

        # When run names it (the run itself replaced: only the broker line matters here)
        monkeypatch.setattr(run_module, "run_footage", stops_after_the_broker_line)
        if "run" not in cli.commands:
            register(cli)
        result = CliRunner(env={"COLUMNS": "400", "ROADSTREAM_REDIS_URL": None}).invoke(
            cli, ["run", str(tmp_path), "--redis", url])
        # Then the broker line names it without calling it private or giving it our bound
        assert "broker: unix://" in result.output, result.output
        assert "private" not in result.output and "memory bound" not in result.output
    finally:
        server.terminate()
        server.wait(timeout=10)
