"""The `dspy-infra` command, run as the real console-script entry point in subprocesses.

No doubles: embedded runs use the real scheduler and process backend on a private state
directory; the server tests run a real `dspy-infra serve` on free ports and a real service
(Python's http.server) on the process backend.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from _rpc_support import stop_process
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import key

from dspy_infra.cli import parse_pairs
from dspy_infra.config import Settings, load_settings
from dspy_infra.config_doc import render_config_template, settings_reference
from dspy_infra.errors import SpecError
from dspy_infra.executors.ray import ray_classes
from dspy_infra.plugins import build_plugin_manager
from dspy_infra.scheduler.classes import resolve_classes
from dspy_infra.services.catalog import parse_service_table

CLI = shutil.which("dspy-infra", path=str(Path(sys.executable).parent)) or "dspy-infra"
READY = re.compile(r"dspy-infra serving grpc=(\S+):(\d+) env_manager=\S+:(\d+) http=\S+:(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    env["XDG_STATE_HOME"] = str(tmp / "xdg-state")
    env["COLUMNS"] = "200"
    return env


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        cwd=cwd,
        env=env if env is not None else clean_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_line_containing(proc: subprocess.Popen[str], needle: str, timeout: float) -> str:
    """The first stdout line of ``proc`` containing ``needle``; "" after ``timeout`` seconds.
    Reads on a thread: select() on a buffered pipe misses lines already in the buffer."""
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout

    def pump() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if needle in line:
            return line
    return ""


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dspy-infra: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["submit"], ["dspy-infra submit", "ID", "--help"]),
        (["submit", "t1", "--payload", "novalue"], ["--payload", "KEY=VALUE"]),
        (["submit", "t1", "--payload", "a=1", "a=2"], ["--payload", "given twice"]),
        (["submit", "t1", "--timeout", "-3"], ["--timeout", "must be > 0"]),
        (["workflow", "create", "w1", "missing.json"], ["FILE", "missing.json"]),
        (["up", "--backend", "nope"], ["--backend", "invalid choice"]),
    ],
)
def test_bad_arguments_are_one_line_with_exit_2(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    assert_one_line_error(run(*args, cwd=tmp_path), 2, *needles)


def test_bad_config_file_names_the_key_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "dspy-infra.toml").write_text('grpc_prot = 5\nbackend = "process"\n')
    proc = run("config", "show", cwd=tmp_path)
    assert_one_line_error(proc, 2, "grpc_prot", "did you mean 'grpc_port'")


def test_malformed_workflow_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "wf.json").write_text('{"steps": [')
    proc = run("--mode", "embedded", "workflow", "create", "w1", "wf.json", cwd=tmp_path)
    assert_one_line_error(proc, 2, "FILE", "wf.json is not valid JSON")


def test_server_that_does_not_answer_is_exit_1(tmp_path: Path) -> None:
    port = free_port()
    proc = run("--addr", f"127.0.0.1:{port}", "tasks", cwd=tmp_path)
    assert_one_line_error(proc, 1, str(port))


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "dspy-infra.toml").write_text("nope = 1\n")
    proc = run("--debug", "config", "show", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr


# -- config init / reference ------------------------------------------------------------------


def test_config_init_writes_a_file_load_settings_accepts(tmp_path: Path) -> None:
    proc = run("config", "init", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "dspy-infra.toml"
    assert load_settings(path, env={}) == Settings()
    text = path.read_text()
    for doc in settings_reference():
        assert doc.name in text
    again = run("config", "init", cwd=tmp_path)
    assert_one_line_error(again, 2, "already exists", "--force")
    path.write_text("# mine\n")
    forced = run("config", "init", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and path.read_text() == render_config_template()


_SCALARS = [d for d in settings_reference() if d.env_var is not None]


def _uncomment(template: str, names: set[str]) -> str:
    out = []
    for line in template.splitlines():
        match = re.match(r"^# ([a-z_]+) = ", line)
        out.append(line[2:] if match and match.group(1) in names else line)
    return "\n".join(out) + "\n"


@given(st.sets(st.sampled_from([d.name for d in _SCALARS])))
@settings(max_examples=40, deadline=None)
def test_uncommented_template_lines_mean_what_they_say(
    tmp_path_factory: pytest.TempPathFactory, names: set[str]
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "dspy-infra.toml"
    path.write_text(_uncomment(render_config_template(), names))
    loaded = load_settings(path, env={})
    for doc in _SCALARS:
        value = getattr(loaded, doc.name)
        expected = doc.example if doc.name in names else doc.default
        if isinstance(value, Path):
            value = str(value)
        assert value == expected, doc.name


def test_template_table_examples_are_valid_for_the_real_parsers(tmp_path: Path) -> None:
    text = "\n".join(
        line[2:] if re.match(r"^# (\[|[a-z_]+ = )", line) else line
        for line in render_config_template().splitlines()
    )
    path = tmp_path / "dspy-infra.toml"
    path.write_text(text + "\n")
    loaded = load_settings(path, env={})
    assert set(loaded.services) == {"redis", "web"}
    assert set(loaded.task_classes) == {"cpu_short", "embed", "train"}
    assert ray_classes(loaded)["train"].actor_options()["resources"] == {"worker2": 1}
    web = parse_service_table("web", loaded.services["web"])
    assert web.command[:3] == ("python3", "-m", "http.server")
    assert web.ports[0].container_port == 8000 and web.health.kind == "http"
    classes = resolve_classes(loaded, build_plugin_manager(load_entry_points=False))
    assert classes["embed"].max_concurrency == 8 and classes["cpu_short"].max_concurrency == 16


def test_every_setting_is_documented() -> None:
    docs = settings_reference()
    assert [d.name for d in docs] == [a.name for a in attrs.fields(Settings)]
    for doc in docs:
        assert doc.description, f"Settings.{doc.name} has no description"
        if doc.default is None:
            assert doc.example is not None, f"Settings.{doc.name} needs an example value"


@given(st.dictionaries(key, st.text(st.characters(blacklist_categories=["Cs"]))))
def test_parse_pairs_round_trips(pairs: dict[str, str]) -> None:
    assert parse_pairs([f"{k}={v}" for k, v in pairs.items()], "--payload") == pairs


@given(st.text(st.characters(blacklist_characters="=", blacklist_categories=["Cs"])))
def test_parse_pairs_refuses_items_without_equals(item: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_pairs([item], "--input")
    assert info.value.field == "--input"


# -- embedded ---------------------------------------------------------------------------------


def test_submit_tasks_status_embedded(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    base = ["--mode", "embedded", "--home", home]
    ok = run(*base, "submit", "t1", "--payload", "handler=exec", "cmd=echo from-cli", "--wait", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "t1: completed" in ok.stdout and "from-cli" in ok.stdout
    bad = run(
        *base, "submit", "t2", "--payload", "handler=exec", "cmd=exit 3", "--wait", "--json", cwd=tmp_path
    )
    assert bad.returncode == 1, bad.stderr
    assert json.loads(bad.stdout)["status"] == "failed"
    listed = run(*base, "tasks", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    by_id = {t["id"]: t for t in json.loads(listed.stdout)}
    assert by_id["t1"]["status"] == "completed" and by_id["t2"]["status"] == "failed"
    assert "from-cli" in by_id["t1"]["result"]["stdout"]
    status = run(*base, "status", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["mode"] == "embedded" and doc["health"]["healthy"] is True
    assert {"cpu_short", "cpu_long"} <= set(doc["queues"])
    unknown = run(*base, "submit", "t3", "--class", "nope", cwd=tmp_path)
    assert_one_line_error(unknown, 2, "task_class", "nope")


# -- against a running server -----------------------------------------------------------------


@attrs.frozen
class Server:
    addr: str
    http_port: int
    web_port: int
    cwd: Path
    env: dict[str, str]
    proc: subprocess.Popen[str]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run("--addr", self.addr, *args, cwd=self.cwd, env=self.env, timeout=timeout)


def serve_argv(home: Path, *extra: str) -> list[str]:
    """``dspy-infra serve`` on ``home`` with every port picked by the system."""
    return [
        CLI,
        "--home",
        str(home),
        "serve",
        "--grpc-port",
        "0",
        "--env-manager-port",
        "0",
        "--http-port",
        "0",
        *extra,
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cwd = tmp_path_factory.mktemp("serve")
    env = clean_env(cwd)
    web_port = free_port()
    (cwd / "dspy-infra.toml").write_text(
        'backend = "process"\n'
        "[services.web]\n"
        f'command = ["{sys.executable}", "-u", "-m", "http.server", "{web_port}", "--bind", "127.0.0.1"]\n'
        f"ports = [{{ container_port = {web_port} }}]\n"
        'health = { kind = "http", path = "/", startup_timeout = 20 }\n'
    )
    proc = subprocess.Popen(
        serve_argv(cwd / "home", "--stop-services"),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = READY.search(line)
    if match is None:
        proc.kill()
        pytest.fail(f"dspy-infra serve did not start: {line}{proc.stdout.read()}")
    try:
        yield Server(f"{match.group(1)}:{match.group(2)}", int(match.group(4)), web_port, cwd, env, proc)
    finally:
        stop_process(proc)


def test_cli_talks_to_a_running_server(server: Server) -> None:
    submitted = server.cli("submit", "r1", "--payload", "handler=exec", "cmd=echo over-grpc", "--wait")
    assert submitted.returncode == 0, submitted.stderr
    assert "r1: completed" in submitted.stdout and "over-grpc" in submitted.stdout
    # A second process sees what the first submitted: one scheduler, in the server.
    listed = server.cli("tasks", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {t["id"]: t["status"] for t in json.loads(listed.stdout)}["r1"] == "completed"
    status = server.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["mode"] == "server"
    text = server.cli("status")
    assert f"(server at {server.addr}, home " in text.stdout.splitlines()[0], text.stdout
    events = server.cli("events", "--type", "task_completed")
    assert events.returncode == 0, events.stderr
    assert re.search(r"task_completed r1\b", events.stdout), events.stdout
    bad = server.cli("submit", "r2", "--class", "nope")
    assert_one_line_error(bad, 2, "nope")


def _get(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
        return int(resp.status)


def test_up_logs_down_a_process_service(server: Server) -> None:
    up = server.cli("up", "web")
    assert up.returncode == 0, up.stderr
    assert re.search(r"web: healthy \[ok\]", up.stdout), up.stdout
    assert _get(server.web_port) == 200
    deadline = time.monotonic() + 10
    while True:  # http.server logs each request on stderr; the backend tails it into a file
        logs = server.cli("logs", "web", "--tail", "20")
        assert logs.returncode == 0, logs.stderr
        if '"GET / HTTP/1.1" 200' in logs.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert '"GET / HTTP/1.1" 200' in logs.stderr
    status = json.loads(server.cli("status", "--json").stdout)
    assert status["services"]["web"]["status"] in ("healthy", "running")
    down = server.cli("down", "web")
    assert down.returncode == 0, down.stderr
    assert "web: stopped" in down.stdout
    with pytest.raises(OSError):
        _get(server.web_port)
    unknown = server.cli("up", "no-such-service")
    assert unknown.returncode == 2 and "no-such-service" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_serve_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        serve_argv(tmp_path / "h"),
        cwd=tmp_path,
        env=clean_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert READY.search(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr
    # It says what it waits for while it shuts down.
    assert "dspy-infra: stopping:" in stderr and "running tasks" in stderr


def test_serve_refuses_a_public_bind_without_token(tmp_path: Path) -> None:
    proc = run("--home", str(tmp_path / "h"), "serve", "--host", "0.0.0.0", "--grpc-port", "0", cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "token" in proc.stderr


def test_workflow_create_run_follow_status_embedded(tmp_path: Path) -> None:
    base = ["--mode", "embedded", "--home", str(tmp_path / "home")]
    (tmp_path / "wf.json").write_text(
        json.dumps(
            {
                "steps": [
                    {"name": "fetch", "payload": {"handler": "exec", "cmd": "echo got-{{ input.model }}"}},
                    {
                        "name": "train",
                        "depends_on": ["fetch"],
                        "payload": {"handler": "exec", "cmd": "echo trained-{{ input.model }}"},
                    },
                ]
            }
        )
    )
    created = run(*base, "workflow", "create", "wf1", "wf.json", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    ran = run(
        *base, "workflow", "run", "wf1", "--input", "model=tiny", "--key", "k1", "--follow", cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stderr
    run_id = re.search(r"^run (\S+) started$", ran.stdout, re.M).group(1)  # type: ignore[union-attr]
    assert re.search(rf"^{run_id}: completed 2/2 .*train.stdout=trained-tiny", ran.stdout, re.M), ran.stdout
    again = run(*base, "workflow", "run", "wf1", "--input", "model=tiny", "--key", "k1", cwd=tmp_path)
    assert again.returncode == 0 and f"run {run_id} started" in again.stdout  # same key, same run
    status = run(*base, "workflow", "status", run_id, "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["status"] == "completed" and doc["input"] == {"model": "tiny"}
    assert {name: step["status"] for name, step in doc["steps"].items()} == {
        "fetch": "completed",
        "train": "completed",
    }
    missing = run(*base, "workflow", "status", "run-nope", cwd=tmp_path)
    assert_one_line_error(missing, 2, "run-nope")


def test_events_follow_streams_live_and_ctrl_c_exits_quietly(server: Server) -> None:
    follower = subprocess.Popen(
        [CLI, "--addr", server.addr, "events", "-f", "--type", "task_completed"],
        cwd=server.cwd,
        env=server.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # let it subscribe (events before that are replayed anyway: since=all)
        done = server.cli("submit", "live-1", "--payload", "handler=noop", "--wait")
        assert done.returncode == 0, done.stderr
        line = read_line_containing(follower, "live-1", timeout=45)  # generous: CI machines are loaded
        assert re.search(r"task_completed live-1\b", line), line
    finally:
        follower.send_signal(signal.SIGINT)
        code = follower.wait(timeout=15)
    assert code == 130
    assert follower.stderr is not None and "Traceback" not in follower.stderr.read()


# -- a complete CLI: cancel, tasks show/log, workflow list/runs/show, honest exit codes ----------


def test_cli_fix_turns_python_calls_into_commands() -> None:
    from dspy_infra.cli import cli_fix

    assert cli_fix("start it: ensure(['redis'])") == "start it: `dspy-infra up redis`"
    assert cli_fix("ensure(['kafka', 'zookeeper']) first") == "`dspy-infra up kafka zookeeper` first"
    assert "--mode embedded" in cli_fix("or run embedded (mode='embedded')")
    assert cli_fix("use a new id") == "use a new id"


def test_cancel_show_and_exit_codes_against_a_server(server: Server) -> None:
    slow = server.cli("submit", "c1", "--payload", "handler=sleep", "seconds=60")
    assert slow.returncode == 0, slow.stderr
    assert re.search(r"submitted c1 \(cpu_short\): (pending|running)", slow.stdout), slow.stdout
    cancelled = server.cli("cancel", "c1")
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith("c1: cancelled"), cancelled.stdout
    again = server.cli("cancel", "c1")
    assert_one_line_error(again, 1, "c1", "already cancelled")
    missing = server.cli("cancel", "no-such-task")
    assert_one_line_error(missing, 2, "no-such-task")

    shown = json.loads(server.cli("tasks", "show", "c1", "--json").stdout)
    assert shown["status"] == "cancelled" and shown["payload"] == {"handler": "sleep", "seconds": "60"}
    assert shown["submitted_at"] > 0 and shown["max_attempts"] == 1

    # A task with no handler: exit 1 and the reason, whether waited for or looked at.
    nohandler = server.cli("submit", "c2", "--payload", "handler=nope", "--wait")
    assert nohandler.returncode == 1, (nohandler.stdout, nohandler.stderr)
    assert "c2: failed" in nohandler.stdout
    assert "task c2 failed" in nohandler.stderr and "no handler named 'nope'" in nohandler.stderr

    # JSON payloads go in whole and results come out as JSON.
    js = server.cli(
        "submit",
        "c3",
        "--payload-json",
        '{"handler": "exec", "cmd": "printf one; echo; echo two"}',
        "--wait",
        "--json",
    )
    assert js.returncode == 0, js.stderr
    assert json.loads(js.stdout)["result"]["stdout"] == "one\ntwo\n"
    text = server.cli("tasks", "show", "c3")
    assert text.returncode == 0, text.stderr
    assert "task c3: completed" in text.stdout and "      one" in text.stdout and "      two" in text.stdout
    both = server.cli("submit", "c4", "--payload", "a=1", "--payload-json", "{}")
    assert_one_line_error(both, 2, "--payload-json", "both")

    # Hints name commands, not Python calls.
    not_running = server.cli("logs", "redis")
    assert_one_line_error(not_running, 2, "`dspy-infra up redis`")
    assert "ensure(" not in not_running.stderr


def test_up_with_another_backend_than_the_servers_is_a_named_error(server: Server) -> None:
    up = server.cli("up", "web", "--backend", "docker")
    assert_one_line_error(up, 1, "backend", "'docker'", "'process'", "--backend")
    status = json.loads(server.cli("status", "--json").stdout)
    assert status["services"].get("web", {}).get("status", "stopped") == "stopped"


def test_workflow_list_runs_show_follow_against_a_server(server: Server) -> None:
    (server.cwd / "wf-ok.json").write_text(
        json.dumps(
            {
                "steps": [
                    {"name": "one", "payload": {"handler": "exec", "cmd": "echo first"}},
                    {"name": "two", "depends_on": ["one"], "payload": {"handler": "noop"}},
                ]
            }
        )
    )
    (server.cwd / "wf-bad.json").write_text(
        json.dumps({"steps": [{"name": "boom", "payload": {"handler": "exec", "cmd": "exit 4"}}]})
    )
    assert server.cli("workflow", "create", "wok", "wf-ok.json", "--description", "two steps").returncode == 0
    assert server.cli("workflow", "create", "wbad", "wf-bad.json").returncode == 0
    listed = server.cli("workflow", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    by_id = {w["id"]: w for w in json.loads(listed.stdout)}
    assert by_id["wok"]["steps"] == ["one", "two"] and by_id["wok"]["description"] == "two steps"

    ok = server.cli("workflow", "run", "wok", "--follow")
    assert ok.returncode == 0, ok.stderr
    run_id = re.search(r"^run (\S+) started$", ok.stdout, re.M).group(1)  # type: ignore[union-attr]
    # The live table's last frame: one row per step, then the run's line.
    assert re.search(r"one\s+│\s+completed", ok.stdout) and re.search(r"two\s+│\s+completed", ok.stdout), (
        ok.stdout
    )
    assert f"{run_id}: completed 2/2" in ok.stdout

    bad = server.cli("workflow", "run", "wbad", "--follow")
    assert bad.returncode == 1, (bad.stdout, bad.stderr)
    assert re.search(r"boom\s+│\s+failed", bad.stdout), bad.stdout
    assert "failed" in bad.stderr and bad.stderr.startswith("dspy-infra: error: run ")

    runs = json.loads(server.cli("workflow", "runs", "wok", "--json").stdout)
    assert [r["run_id"] for r in runs] == [run_id]
    assert runs[0]["steps"]["one"]["status"] == "completed" and runs[0]["steps_completed"] == 2
    assert {r["workflow_id"] for r in json.loads(server.cli("workflow", "runs", "--json").stdout)} >= {
        "wok",
        "wbad",
    }
    shown = server.cli("workflow", "show", run_id)
    assert shown.returncode == 0, shown.stderr
    assert f"run {run_id} of wok: completed" in shown.stdout
    assert re.search(rf"one\s+│\s+completed\s+│\s+1\s+│\s+{re.escape(run_id)}\.one", shown.stdout), (
        shown.stdout
    )


def test_submit_without_a_server_never_claims_it_ran(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    env["DSPY_INFRA_SHUTDOWN_GRACE"] = "1"
    base = ["--mode", "embedded", "--home", str(tmp_path / "home")]
    slow = run(*base, "submit", "s1", "--payload", "handler=sleep", "seconds=30", cwd=tmp_path, env=env)
    assert slow.returncode == 0, slow.stderr
    assert "submitted s1 (cpu_short): pending" in slow.stdout and ": running" not in slow.stdout
    assert "stays stored, unfinished" in slow.stdout and "dspy-infra serve" in slow.stdout
    # The shutdown said what it waited for.
    assert "dspy-infra: stopping:" in slow.stderr
    quick = run(*base, "submit", "s2", "--payload", "handler=exec", "cmd=echo done", cwd=tmp_path, env=env)
    assert quick.returncode == 0, quick.stderr
    assert "s2: completed" in quick.stdout and "stdout: done" in quick.stdout
    # Rerunning with a fixed id and other content: the error says why the id is taken.
    reused = run(*base, "submit", "s2", "--payload", "handler=exec", "cmd=echo other", cwd=tmp_path, env=env)
    assert reused.returncode == 2, reused.stderr
    error = reused.stderr.strip().splitlines()[-1]  # after the shutdown notice (s1 runs again)
    assert error.startswith("dspy-infra: error: id: task 's2' already exists in the state directory")
    assert "`dspy-infra tasks show s2`" in error
    failed = run(*base, "submit", "s3", "--payload", "handler=nope", cwd=tmp_path, env=env)
    assert failed.returncode == 1
    assert "task s3 failed" in failed.stderr and "no handler named 'nope'" in failed.stderr


@pytest.mark.parametrize("value", [(), ("a", "b"), [1, 2], ("x y", 'q"uote')])
def test_list_settings_render_as_toml_arrays(value: object) -> None:
    import tomllib

    from dspy_infra.config_doc import _toml_value

    assert tomllib.loads(f"v = {_toml_value(value)}")["v"] == list(value)  # type: ignore[call-overload]


def test_tasks_log_prints_what_the_handler_wrote(server: Server) -> None:
    done = server.cli(
        "submit", "lg1", "--payload", "handler=exec", "cmd=echo to-out; echo to-err >&2", "--wait"
    )
    assert done.returncode == 0, done.stderr
    log = server.cli("tasks", "log", "lg1")
    assert log.returncode == 0, log.stderr
    assert "to-out" in log.stdout and "to-err" in log.stdout
    missing = server.cli("tasks", "log", "no-such-task")
    assert_one_line_error(missing, 2, "no-such-task")
