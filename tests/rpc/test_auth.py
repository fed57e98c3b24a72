"""Security at the edge: no non-loopback bind without a token; bearer tokens on every gRPC
call; TLS with a certificate made at test time by openssl."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from _rpc_support import in_process_server
from engines import skip_or_fail
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from hypothesis import given
from hypothesis import strategies as st
from strategies import loopback_v4, public_v4

from dspy_infra import errors
from dspy_infra.config import load_settings
from dspy_infra.rpc._gen.orchestrator import v1 as orch_pb
from dspy_infra.rpc.client import OrchestratorClient
from dspy_infra.rpc.remote import RemoteInfra
from dspy_infra.serve import check_bind, run_server


@given(host=public_v4 | st.sampled_from(["0.0.0.0", "::", "", "example.com", "10.0.0.1"]))
def test_non_loopback_without_token_is_refused(host: str) -> None:
    with pytest.raises(errors.SpecError) as info:
        check_bind(load_settings(env={}, host=host))
    assert info.value.field == "host" and "token" in str(info.value)
    check_bind(load_settings(env={}, host=host, token="t"))  # with a token it is allowed


@given(host=loopback_v4 | st.sampled_from(["::1", "localhost"]))
def test_loopback_needs_no_token(host: str) -> None:
    check_bind(load_settings(env={}, host=host))


async def test_run_server_refuses_before_starting_anything(tmp_path: Path) -> None:
    settings = load_settings(env={}, host="0.0.0.0", home=str(tmp_path / "s"), grpc_port=0)
    with pytest.raises(errors.SpecError):
        await run_server(settings)
    assert not (tmp_path / "s").exists()  # nothing was started, not even the state directory


async def test_token_required_on_every_grpc_call(tmp_path: Path) -> None:
    async with in_process_server(tmp_path / "s", token="s3cret") as (_infra, server):
        addr = f"127.0.0.1:{server.grpc_port}"
        async with OrchestratorClient.connect(addr) as anonymous:
            with pytest.raises(GRPCError) as info:
                await anonymous.stub.health(orch_pb.HealthRequest())
            assert info.value.status is Status.UNAUTHENTICATED
            with pytest.raises(GRPCError) as info:
                await anonymous.stub.submit_task(
                    orch_pb.SubmitTaskRequest(id="x", payload={"handler": "noop"})
                )
            assert info.value.status is Status.UNAUTHENTICATED
            with pytest.raises(GRPCError) as info:
                async for _ in anonymous.stub.stream_events(orch_pb.StreamEventsRequest()):
                    break
            assert info.value.status is Status.UNAUTHENTICATED
        # The refused submit left nothing behind.
        with pytest.raises(errors.NotFound):
            await _infra.get_task("x")
        async with OrchestratorClient.connect(addr, token="wrong") as wrong:
            with pytest.raises(errors.Unauthenticated):
                await wrong.health_check()
        async with OrchestratorClient.connect(addr, token="s3cret") as good:
            assert (await good.health_check())["healthy"] is True
            state = await good.submit_task("y", payload={"handler": "noop"})
            assert (await good.wait(state.id, timeout=30)).status == "completed"
        # RemoteInfra.connect says which knob to turn when the token is wrong.
        with pytest.raises(errors.Unauthenticated) as bad:
            await RemoteInfra.connect(addr, token="wrong", required=False)
        assert bad.value.field == "token"
        remote = await RemoteInfra.connect(addr, token="s3cret", required=True)
        assert remote is not None
        await remote.aclose()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        skip_or_fail("openssl is not installed (apt-get install openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_with_token(tmp_path: Path) -> None:
    import aiohttp

    cert, key = _self_signed(tmp_path)
    async with in_process_server(tmp_path / "s", token="t0k", tls_cert=str(cert), tls_key=str(key)) as (
        _infra,
        server,
    ):
        addr = f"127.0.0.1:{server.grpc_port}"
        async with OrchestratorClient.connect(addr, token="t0k", tls=str(cert)) as client:
            assert (await client.health_check())["healthy"] is True
        # Plain-text gRPC to a TLS port does not get through.
        async with OrchestratorClient.connect(addr, token="t0k") as plain:
            with pytest.raises(errors.InfraError):
                await plain.health_check(timeout=2)
        # HTTP is served over TLS too.
        ctx = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{server.http_port}/health", ssl=ctx) as resp:
                assert resp.status == 200


def test_tls_needs_both_cert_and_key() -> None:
    with pytest.raises(errors.SpecError) as info:
        check_bind(load_settings(env={}, tls_cert="/x.pem"))
    assert info.value.field == "tls_key"


async def test_server_exit_ends_open_streams(tmp_path: Path) -> None:
    # A client holding a live stream (and its connection) does not keep the server open.
    import time

    import anyio

    got: list[BaseException] = []
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            async with in_process_server(tmp_path / "s") as (_infra, server):
                client = OrchestratorClient.connect(f"127.0.0.1:{server.grpc_port}")

                async def listen() -> None:
                    try:
                        async for _ in client.stream_events(["never_published"]):
                            pass
                    except errors.InfraError as exc:
                        got.append(exc)

                tg.start_soon(listen)
                await anyio.sleep(0.3)
                began = time.perf_counter()
            closed_in = time.perf_counter() - began
    client.close()
    assert closed_in < 6.0
    assert got, "the stream should end with an error when the server goes away"
    assert isinstance(got[0], errors.Unavailable) and "shutting down" in str(got[0])
