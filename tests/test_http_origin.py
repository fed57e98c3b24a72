"""The HTTP API is not reachable from a web page (issue 8 item 6).

A page on another origin can make a browser send a "simple" cross-origin POST (text/plain or
form body, no preflight), and DNS rebinding lets a foreign name reach 127.0.0.1. So every
mutating endpoint needs ``Content-Type: application/json`` and refuses a foreign ``Origin``,
and the server answers only ``Host`` names it serves. The attacks are replayed with the exact
headers a browser sends, and once for real with headless Chromium."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _rpc_support import in_process_server
from aiohttp import web
from engines import skip_or_fail

from dspy_infra.infra import Infra

EXEC = {"payload": {"handler": "exec", "cmd": "id -un"}}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Infra, str, int]]:
    async with in_process_server(tmp_path / "s", allowed_hosts=["proxy.example", "other.example:8443"]) as (
        infra,
        server,
    ):
        yield infra, f"http://127.0.0.1:{server.http_port}", server.http_port


async def post(base: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/queue/submit", data=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


async def test_a_cross_origin_text_plain_post_is_refused(served: tuple[Infra, str, int]) -> None:
    infra, base, _ = served
    body = json.dumps(EXEC).encode()
    # What fetch(url, {method: "POST", mode: "no-cors", body}) from evil.example sends.
    status, doc = await post(
        base, body, {"Content-Type": "text/plain;charset=UTF-8", "Origin": "http://evil.example"}
    )
    assert status == 403 and doc["field"] == "Origin"
    # Without an Origin (an old browser, a form): still refused, by Content-Type.
    for content_type in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
    ):
        status, doc = await post(base, body, {"Content-Type": content_type} if content_type else {})
        assert status == 415 and doc["field"] == "Content-Type", (content_type, doc)
    assert await infra.list_tasks() == []


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "http://127.0.0.1.evil.example",
        "null",
        "http://127.0.0.1:1",
        "https://localhost",
        "file://",
    ],
)
async def test_a_foreign_origin_is_refused_even_with_json(
    served: tuple[Infra, str, int], origin: str
) -> None:
    infra, base, _ = served
    status, doc = await post(
        base, json.dumps(EXEC).encode(), {"Content-Type": "application/json", "Origin": origin}
    )
    assert status == 403 and doc["field"] == "Origin", doc
    assert await infra.list_tasks() == []


async def test_same_origin_and_programs_may_submit(served: tuple[Infra, str, int]) -> None:
    infra, base, port = served
    body = json.dumps({"payload": {"handler": "noop"}}).encode()
    for headers in (
        {"Content-Type": "application/json"},  # a program: no Origin
        {"Content-Type": "application/json; charset=utf-8", "Origin": f"http://127.0.0.1:{port}"},
        {"Content-Type": "application/json", "Origin": f"http://localhost:{port}"},
    ):
        status, doc = await post(base, body, headers)
        assert status == 200, (headers, doc)
    assert len(await infra.list_tasks()) == 3


async def test_a_cross_site_fetch_is_refused_by_sec_fetch_site(served: tuple[Infra, str, int]) -> None:
    infra, base, _ = served
    status, doc = await post(
        base, json.dumps(EXEC).encode(), {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}
    )
    assert status == 403 and doc["field"] == "Sec-Fetch-Site"
    assert await infra.list_tasks() == []


@pytest.mark.parametrize("path", ["/queue/status", "/health", "/metrics", "/queue/submit", "/nowhere"])
@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "127.0.0.1:1",
        "localhost",
        "proxy.example.evil:{port}",
        "[::2]:{port}",
    ],
)
async def test_a_foreign_host_gets_421_on_every_path(
    served: tuple[Infra, str, int], path: str, host: str
) -> None:
    """DNS rebinding: the browser sends the attacker's name in Host."""
    infra, base, port = served
    async with aiohttp.ClientSession() as session:
        method = session.post if path == "/queue/submit" else session.get
        async with method(
            base + path,
            headers={"Host": host.format(port=port), "Content-Type": "application/json"},
            data=json.dumps(EXEC),
        ) as resp:
            assert resp.status == 421, await resp.text()
            assert (await resp.json())["field"] == "Host"
    assert await infra.list_tasks() == []


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "localhost:{port}",
        "LOCALHOST:{port}",
        "proxy.example",
        "proxy.example:80",
        "other.example:8443",
    ],
)
async def test_served_host_names_are_answered(served: tuple[Infra, str, int], host: str) -> None:
    _, base, port = served
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/queue/status", headers={"Host": host.format(port=port)}) as resp:
            assert resp.status == 200, await resp.text()


async def test_allowed_hosts_with_a_port_match_only_that_port(served: tuple[Infra, str, int]) -> None:
    _, base, _ = served
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/health", headers={"Host": "other.example:9999"}) as resp:
            assert resp.status == 421


async def test_ipv6_loopback_host_is_served(tmp_path: Path) -> None:
    async with in_process_server(tmp_path / "s", host="::1") as (_infra, server):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://[::1]:{server.http_port}/queue/status") as resp:
                assert resp.status == 200


async def test_http_submits_that_run_commands_are_refused_under_exec_policy(tmp_path: Path) -> None:
    async with in_process_server(tmp_path / "s", exec_policy="embedded") as (infra, server):
        base = f"http://127.0.0.1:{server.http_port}"
        for payload in (EXEC["payload"], {"handler": "container", "image": "alpine"}, {"handler": "{{ x }}"}):
            status, doc = await post(
                base, json.dumps({"payload": payload}).encode(), {"Content-Type": "application/json"}
            )
            assert status == 403 and "exec_policy" in doc["error"], doc
        assert await infra.list_tasks() == []
        # The owning process may still run commands through the Python API.
        state = await infra.submit_task("local", payload={"handler": "exec", "cmd": "true"})
        assert state.id == "local"


# -- a real browser --------------------------------------------------------------------


async def _chromium(*args: str) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        skip_or_fail("no chromium on PATH")
        raise AssertionError  # unreachable
    proc = await asyncio.create_subprocess_exec(
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--virtual-time-budget=5000",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode(errors="replace")


ATTACK_PAGE = """<!doctype html><body><p id="log">start</p><form id="f" method="POST"
 enctype="text/plain" action="{target}"><input name='{{"payload": {{"handler": "exec", "cmd": "id -un", "x": "' value='"}}}}'></form>
<script>
const log = (t) => document.getElementById("log").textContent += " " + t;
const body = JSON.stringify({{payload: {{handler: "exec", cmd: "id -un"}}}});
fetch("{target}", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}})
  .then(() => log("fetch-sent"), (e) => log("fetch-failed"))
  .then(() => fetch("{target}", {{method: "POST", mode: "cors", headers: {{"Content-Type": "application/json"}}, body}}))
  .then((r) => log("json-" + r.status), (e) => log("json-blocked"))
  .finally(() => {{ log("done"); }});
</script></body>"""


async def test_a_real_browser_page_on_another_origin_cannot_submit(tmp_path: Path) -> None:
    async with in_process_server(tmp_path / "s") as (infra, server):
        target = f"http://127.0.0.1:{server.http_port}/queue/submit"

        async def page(_request: web.Request) -> web.Response:
            return web.Response(text=ATTACK_PAGE.format(target=target), content_type="text/html")

        app = web.Application()
        app.router.add_get("/", page)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            dom = await _chromium("--dump-dom", f"http://127.0.0.1:{port}/")
        finally:
            await runner.cleanup()
        # The page's script ran both attempts: the no-cors one was sent (the browser does not
        # stop it; only the server can), the JSON one needs a preflight we never answer.
        assert "fetch-sent" in dom and "json-blocked" in dom and "done" in dom, dom[-500:]
        assert await infra.list_tasks() == []


async def test_a_real_browser_after_dns_rebinding_cannot_read_the_queue(tmp_path: Path) -> None:
    async with in_process_server(tmp_path / "s") as (_infra, server):
        dom = await _chromium(
            "--host-resolver-rules=MAP rebind.example 127.0.0.1",
            "--dump-dom",
            f"http://rebind.example:{server.http_port}/queue/status",
        )
    assert "cpu_short" not in dom
    assert "does not serve the host" in dom


def test_allowed_hosts_reads_a_toml_array_or_a_comma_separated_variable(tmp_path: Path) -> None:
    from dspy_infra.config import load_settings
    from dspy_infra.errors import ConfigError

    path = tmp_path / "dspy-infra.toml"
    path.write_text('allowed_hosts = ["Infra.Example.com", "proxy:8443"]\n')
    assert load_settings(path, env={}).allowed_hosts == ("infra.example.com", "proxy:8443")
    env = {"DSPY_INFRA_ALLOWED_HOSTS": "a.example, b.example:9097,"}
    assert load_settings(env=env).allowed_hosts == ("a.example", "b.example:9097")
    path.write_text("allowed_hosts = 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.field == "allowed_hosts"
