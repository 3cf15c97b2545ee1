"""SIGHUP re-reads --env-file and applies the log level while serving;
the shipped systemd unit runs Aivonx that way."""
from __future__ import annotations

import os
import re
import shlex
import signal

from tornado.httpclient import AsyncHTTPClient

from aivonx.settings import RELOADABLE, build_parser, parse_settings, read_env_file
from tests.helpers import ROOT, start_aivonx

UNIT = os.path.join(ROOT, "contrib", "systemd", "aivonx.service")
ENV_EXAMPLE = os.path.join(ROOT, "contrib", "systemd", "aivonx.env")
ACCESS_LINE = r"aivonx\.access: 200 GET /api/health"


async def test_sighup_applies_the_new_log_level_and_keeps_serving(io_loop, make_node, tmp_path):
    node = await make_node()
    env_file = tmp_path / "aivonx.env"
    env_file.write_text("AIVONX_LOG_LEVEL=info\n")
    proc = await start_aivonx("--db", str(tmp_path / "r.db"), "--node", node.url,
                              "--env-file", str(env_file))
    client = AsyncHTTPClient()
    try:
        await client.fetch(proc.url + "/api/health")
        # At info a successful request writes no line.
        env_file.write_text("# now verbose\nAIVONX_LOG_LEVEL='debug'\nAIVONX_MAX_WAIT=3\n")
        mark = len(proc.lines)
        proc.proc.send_signal(signal.SIGHUP)
        await proc.wait_for(r"reloaded settings: log_level=debug", start=mark)
        await proc.wait_for(r"applied only after a restart: max_wait", start=mark)
        assert not any(re.search(ACCESS_LINE, line) for line in proc.lines)
        response = await client.fetch(proc.url + "/api/health")
        assert response.code == 200
        await proc.wait_for(ACCESS_LINE, start=mark)
        # An invalid file is refused and the process keeps its settings.
        env_file.write_text("AIVONX_LOG_LEVEL=loud\n")
        mark = len(proc.lines)
        proc.proc.send_signal(signal.SIGHUP)
        await proc.wait_for(r"reload failed", start=mark)
        assert (await client.fetch(proc.url + "/api/tags")).code == 200
        await proc.wait_for(r"aivonx\.access: 200 GET /api/tags", start=mark)
    finally:
        assert await proc.stop() == 0


def test_env_file_wins_over_the_environment_and_flags_win_over_it(tmp_path):
    env_file = tmp_path / "a.env"
    env_file.write_text('export AIVONX_PORT="9100"\n; comment\nAIVONX_MAX_WAIT=4\n\n')
    env = {"AIVONX_ENV_FILE": str(env_file), "AIVONX_PORT": "9000", "AIVONX_MAX_QUEUE": "5"}
    settings = parse_settings(["--max-wait", "6"], env)
    assert (settings.port, settings.max_wait, settings.max_queue) == (9100, 6.0, 5)
    assert settings.env_file == str(env_file)


def unit_settings() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    with open(UNIT, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", "[")):
                key, _, value = line.partition("=")
                values.setdefault(key, []).append(value)
    return values


def test_systemd_unit_restarts_reloads_and_runs_unprivileged():
    unit = unit_settings()
    assert unit["Restart"] == ["on-failure"]
    assert unit.get("DynamicUser") == ["yes"] or unit.get("User")
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    (env_file,) = unit["EnvironmentFile"]
    # Aivonx is told to re-read the same file, with flags it knows.
    command = shlex.split(unit["ExecStart"][0])
    assert command[command.index("--env-file") + 1] == env_file
    args = build_parser({}).parse_args(command[2:])
    assert args.env_file == env_file
    assert "log_level" in RELOADABLE
    # The example environment file names only variables Aivonx reads.
    known = set(re.findall(r"\b(AIVONX_[A-Z_]+)\b", build_parser({}).format_help()))
    assert set(read_env_file(ENV_EXAMPLE)) <= known | {"AIVONX_ROOT_PASSWORD"}
