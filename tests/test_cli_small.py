"""The CLI's small courtesies: unknown settings named, unknown dead letters said, the
default Redis announced, empty streams hidden from ``status`` unless ``--all``."""

from __future__ import annotations

import pytest
import redis
from click.testing import CliRunner

from stream.errors import ConfigError
from stream.settings import load_settings
from workers.cli import _register_commands, cli

_register_commands()


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner(env={"COLUMNS": "200", "ROADSTREAM_REDIS_URL": None, **(env or {})}).invoke(cli, list(args))


def test_an_unknown_set_key_is_an_error_naming_it(tmp_path):
    # Given --set with a key no section has / When a command reads its settings
    result = invoke("--set", "detect.bogus=1", "eval", "--labels", str(tmp_path / "l.csv"), "--verdicts", "v")
    # Then it stops before doing anything, naming the key
    assert result.exit_code == 1
    assert "unknown setting detect.bogus" in result.output


def test_an_unknown_config_file_key_is_an_error_naming_file_and_key(tmp_path):
    config = tmp_path / "roadstream.yaml"
    config.write_text("detect:\n  model: shipped\n  bogus: 1\nfuse:\n  window_s: 2\n")
    with pytest.raises(ConfigError, match=rf"config file {config}: unknown setting detect.bogus"):
        load_settings(environ={}, config_file=config)


def test_an_unknown_environment_variable_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="ROADSTREAM_DETECT__MODDEL is no setting"):
        load_settings(environ={"ROADSTREAM_DETECT__MODDEL": "x.pt"})
    # Variables that are not settings (CLI and tests) and free-form mappings stay allowed
    load_settings(environ={"ROADSTREAM_LOG_FORMAT": "json", "ROADSTREAM_TEST_REDIS_URL": "redis://x"},
                  detect={"classes": {"anything": "cone"}})  # fmt: skip


def test_a_command_without_redis_says_it_uses_the_default(tmp_path):
    # Given no --redis and no ROADSTREAM_REDIS_URL (the labels file fails before any connection)
    result = invoke("eval", "--labels", str(tmp_path / "nope.csv"))
    # Then it says which Redis it would use
    assert "using Redis at redis://127.0.0.1:6379/0 (the default" in result.output
    # And a named one is not announced
    named = invoke("eval", "--labels", str(tmp_path / "nope.csv"), "--redis", "redis://example:1/0")
    assert "using Redis" not in named.output


def test_deadletters_show_of_an_unknown_id_says_so_and_exits_1(redis_url):
    result = invoke("deadletters", "show", "1-0", "--redis", redis_url)
    assert result.exit_code == 1
    assert "no dead letter 1-0" in result.output


def test_status_hides_empty_streams_unless_all(redis_url):
    # Given a stream with an entry and one that is empty (its group made it)
    client = redis.Redis.from_url(redis_url)
    client.xadd("rs:jobs", {"x": "1"})
    client.xgroup_create("rs:verdicts", "users", id="0", mkstream=True)
    # When status runs / Then only the stream with entries shows, and it says one is hidden
    plain = invoke("status", "--redis", redis_url)
    assert plain.exit_code == 0, plain.output
    assert "rs:jobs" in plain.output and "rs:verdicts" not in plain.output
    assert "1 empty stream(s) hidden (--all shows them)" in plain.output
    # When --all / Then both
    every = invoke("status", "--all", "--redis", redis_url)
    assert "rs:jobs" in every.output and "rs:verdicts" in every.output


def test_the_readme_sample_of_run_shows_the_broker_line_run_prints():
    import re
    from pathlib import Path

    # run prints its private server's memory bound beside the broker (workers/cli/run.py);
    # the README's sample output (wrapped at 80 columns there) must show it too
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    source = (Path(__file__).parent.parent / "workers" / "cli" / "run.py").read_text()
    assert "(private redis-server, memory bound" in source
    assert re.search(r"broker: unix:///tmp/roadstream-…/redis\.sock\?db=0 \(private redis-server,\s+memory bound "
                     r"[0-9.]+ GiB, no persistence\)", readme)  # fmt: skip


def test_status_shows_a_worker_record_that_lacks_a_count_as_zero():
    from rich.console import Console

    from workers.cli import status_tables

    # Given a worker's health record without "dead" and "failed" (another version wrote it)
    old = {"group": "detect", "consumer": "detect-a", "at": 10.0, "counts": {"in": 5, "out": 5}, "partitions": [0]}
    new = {**old, "at": 12.0, "counts": {"in": 9, "out": 8}}
    status = {"streams": [], "workers": [new], "owners": {}, "dead_letters": 0}
    # When the status tables are drawn against the previous snapshot
    console = Console(width=200, record=True)
    console.print(status_tables(status, {"workers": [old]}))
    text = console.export_text()
    # Then the row shows the counts it has, the missing ones as 0, and the rate from "in"
    row = next(line for line in text.splitlines() if "detect-a" in line)
    assert [cell.strip() for cell in row.split("│")[3:8]] == ["9", "8", "0", "0", "2.0"], row
