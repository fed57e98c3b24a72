"""Bad requests get the right gRPC status naming the field; the server keeps serving and
nothing changes. Also: the one error -> status table and its mirror in the client."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from _rpc_support import ServeProcess, in_process_server, serve_process
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import word

from dspy_infra import errors
from dspy_infra.rpc._gen.env_manager import v1 as env_pb
from dspy_infra.rpc._gen.orchestrator import v1 as orch_pb
from dspy_infra.rpc.client import EnvManagerClient, OrchestratorClient
from dspy_infra.values import json_text
from dspy_infra.wire import from_grpc_error, grpc_status_for, to_grpc_error

# -- the table, without a server -------------------------------------------------------------

EXPECTED = {
    errors.SpecError: Status.INVALID_ARGUMENT,
    errors.ConfigError: Status.INVALID_ARGUMENT,
    errors.NotFound: Status.NOT_FOUND,
    errors.AlreadyExists: Status.ALREADY_EXISTS,
    errors.FailedPrecondition: Status.FAILED_PRECONDITION,
    errors.ResourceUnavailable: Status.FAILED_PRECONDITION,
    errors.Unavailable: Status.UNAVAILABLE,
    errors.BackendUnavailable: Status.UNAVAILABLE,
    errors.DeadlineExceeded: Status.DEADLINE_EXCEEDED,
    errors.Unauthenticated: Status.UNAUTHENTICATED,
    errors.MissingBinary: Status.FAILED_PRECONDITION,
    errors.InfraError: Status.INTERNAL,
    errors.BackendError: Status.INTERNAL,
}

CLIENT_CLASS = {
    Status.INVALID_ARGUMENT: errors.SpecError,
    Status.NOT_FOUND: errors.NotFound,
    Status.ALREADY_EXISTS: errors.AlreadyExists,
    Status.FAILED_PRECONDITION: errors.FailedPrecondition,
    Status.UNAVAILABLE: errors.Unavailable,
    Status.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    Status.UNAUTHENTICATED: errors.Unauthenticated,
    Status.INTERNAL: errors.InfraError,
}


def test_cycle_error_is_invalid_argument() -> None:
    err = to_grpc_error(errors.CycleError(["a", "b", "a"]))
    assert err.status is Status.INVALID_ARGUMENT
    assert "depends_on" in (err.message or "") and "a -> b -> a" in (err.message or "")


def test_refusals_by_policy_and_by_the_machine_are_not_internal() -> None:
    assert grpc_status_for(errors.PermissionDenied("x")) is Status.PERMISSION_DENIED
    assert grpc_status_for(errors.ServiceError("port taken", service="redis")) is Status.FAILED_PRECONDITION


def test_unexpected_exception_is_internal() -> None:
    assert grpc_status_for(RuntimeError("boom")) is Status.INTERNAL
    # The client learns that it is a server bug, never the exception's class or text.
    message = to_grpc_error(RuntimeError("boom")).message or ""
    assert "internal error" in message
    assert "RuntimeError" not in message and "boom" not in message


@given(
    cls=st.sampled_from(sorted(EXPECTED, key=lambda c: c.__name__)),
    message=st.text(min_size=1, max_size=60).filter(lambda s: s.strip() == s and s),
    field=st.none() | word,
    fix=st.none() | st.text(min_size=1, max_size=40).filter(lambda s: s.strip() == s and s),
)
def test_error_round_trips_through_the_wire(
    cls: type[errors.InfraError], message: str, field: str | None, fix: str | None
) -> None:
    exc = cls(message, field=field, fix=fix)
    wire = to_grpc_error(exc)
    assert wire.status is EXPECTED[cls]
    back = from_grpc_error(wire)
    # The client gets the class the status stands for, and the same one-line text.
    assert type(back) is CLIENT_CLASS[wire.status]
    if wire.status is not Status.INTERNAL:
        assert str(back) == str(exc)


# -- a live in-process server ------------------------------------------------------------------


@pytest.fixture
async def clients(tmp_path: Path) -> AsyncIterator[tuple[OrchestratorClient, EnvManagerClient, object]]:
    async with in_process_server(tmp_path / "state", max_payload_bytes=4096) as (infra, server):
        addr = f"127.0.0.1:{server.grpc_port}"
        async with OrchestratorClient.connect(addr) as orch, EnvManagerClient.connect(addr) as env:
            yield orch, env, infra


async def _status_of(call: object) -> GRPCError:
    with pytest.raises(GRPCError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_bad_requests_name_the_field_and_change_nothing(
    clients: tuple[OrchestratorClient, EnvManagerClient, object],
) -> None:
    orch, env, _ = clients
    stub, env_stub = orch.stub, env.stub
    before = await orch.list_tasks(limit=1000)

    cases: list[tuple[object, Status, str]] = [
        (
            stub.submit_task(orch_pb.SubmitTaskRequest(id="", payload={"handler": "noop"})),
            Status.INVALID_ARGUMENT,
            "id",
        ),
        (
            stub.submit_task(orch_pb.SubmitTaskRequest(id="t1", class_="no_such_class")),
            Status.INVALID_ARGUMENT,
            "class",
        ),
        (
            stub.submit_task(
                orch_pb.SubmitTaskRequest(id="t2", payload={"handler": "noop", "blob": "x" * 5000})
            ),
            Status.INVALID_ARGUMENT,
            "payload",
        ),
        (stub.get_task_status(orch_pb.GetTaskStatusRequest(task_id="")), Status.INVALID_ARGUMENT, "task_id"),
        (stub.get_task_status(orch_pb.GetTaskStatusRequest(task_id="missing")), Status.NOT_FOUND, "missing"),
        (
            stub.create_workflow(orch_pb.CreateWorkflowRequest(id="wf", spec=b'{"steps": [')),
            Status.INVALID_ARGUMENT,
            "spec",
        ),
        (
            stub.create_workflow(orch_pb.CreateWorkflowRequest(id="", spec=b"{}")),
            Status.INVALID_ARGUMENT,
            "id",
        ),
        (
            stub.start_workflow_run(orch_pb.StartWorkflowRunRequest(workflow_id="nope")),
            Status.NOT_FOUND,
            "nope",
        ),
        (stub.list_tasks(orch_pb.ListTasksRequest(status="bogus")), Status.INVALID_ARGUMENT, "status"),
        (
            env_stub.restart_service(env_pb.RestartServiceRequest(service_name="")),
            Status.INVALID_ARGUMENT,
            "service_name",
        ),
        (
            env_stub.get_resource_availability(env_pb.GetResourceAvailabilityRequest(workload_class="warp")),
            Status.INVALID_ARGUMENT,
            "workload_class",
        ),
        (
            env_stub.execute_task(env_pb.ExecuteTaskRequest(task_id="x", workload_class="warp")),
            Status.INVALID_ARGUMENT,
            "class",
        ),
    ]
    for call, status, field in cases:
        err = await _status_of(call)
        assert err.status is status, (field, err)
        assert field in (err.message or ""), (field, err.message)

    # Streams refuse the same way, and the unknown service is named.
    with pytest.raises(GRPCError) as info:
        async for _ in env_stub.start_services(env_pb.StartServicesRequest(service_names=["no-such-svc"])):
            pass
    assert info.value.status in (Status.INVALID_ARGUMENT, Status.NOT_FOUND)
    assert "no-such-svc" in (info.value.message or "")
    with pytest.raises(GRPCError) as info:
        async for _ in env_stub.start_services(env_pb.StartServicesRequest(service_names=["Bad Name"])):
            pass
    assert info.value.status is Status.INVALID_ARGUMENT and "service_names[0]" in (info.value.message or "")

    # Nothing changed, and the server still serves.
    assert await orch.list_tasks(limit=1000) == before
    assert (await orch.health_check())["version"]
    state = await orch.submit_task("ok-after-errors", payload={"handler": "noop"})
    assert (await orch.wait(state.id, timeout=30)).status == "completed"


async def test_client_raises_dspy_infra_errors(
    clients: tuple[OrchestratorClient, EnvManagerClient, object],
) -> None:
    orch, _, _ = clients
    with pytest.raises(errors.SpecError) as spec_err:
        await orch.submit_task("a", "no_such_class", {"handler": "noop"})
    assert spec_err.value.field == "task_class"
    with pytest.raises(errors.NotFound):
        await orch.get_task_status("never-submitted")
    await orch.submit_task("dup", payload={"handler": "noop"})
    with pytest.raises(errors.AlreadyExists):
        await orch.submit_task("dup", payload={"handler": "noop", "other": "content"})
    slow = await orch.submit_task("slow", payload={"handler": "sleep", "seconds": "5"})
    with pytest.raises(errors.DeadlineExceeded):
        await orch.wait(slow.id, timeout=0.2)
    await orch.cancel_task(slow.id)


async def test_gpu_class_without_gpu_is_failed_precondition(
    clients: tuple[OrchestratorClient, EnvManagerClient, object],
) -> None:
    orch, _, infra = clients
    hw = await infra.services.resources("gpu")  # type: ignore[attr-defined]
    if hw.hardware.gpus:
        pytest.skip("this machine has a GPU")
    err = await _status_of(orch.stub.submit_task(orch_pb.SubmitTaskRequest(id="g", class_="gpu")))
    assert err.status is Status.FAILED_PRECONDITION


# -- property: the payload limit over a real server subprocess ---------------------------------

LIMIT = 2048


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with serve_process(tmp_path_factory.mktemp("srv"), max_payload_bytes=LIMIT) as proc:
        yield proc


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(min_value=0, max_value=2 * LIMIT), bad_class=st.booleans())
def test_accepted_iff_valid_and_nothing_accepted_is_lost(
    server: ServeProcess, size: int, bad_class: bool
) -> None:
    task_id = uuid.uuid4().hex
    value = "v" * max(0, size - len("handler") - len("noop") - len("blob"))
    payload = {"handler": "noop", "blob": value}
    total = len(json_text(payload).encode())  # the limit applies to the payload as JSON

    async def go() -> None:
        async with OrchestratorClient.connect(server.addr) as orch:
            try:
                await orch.submit_task(task_id, "warp" if bad_class else "cpu_short", payload)
            except errors.SpecError as exc:
                assert bad_class or total > LIMIT
                assert exc.field == ("task_class" if bad_class else "payload")
                with pytest.raises(errors.NotFound):
                    await orch.get_task_status(task_id)
                return
            assert not bad_class and total <= LIMIT
            result = await orch.wait(task_id, timeout=30)
            assert result.status == "completed"

    anyio.run(go)


async def test_batch_submit_rejects_only_the_bad_tasks(
    clients: tuple[OrchestratorClient, EnvManagerClient, object],
) -> None:
    from dspy_infra.models import TaskSpec

    orch, _, _ = clients
    await orch.submit_task("taken", payload={"handler": "noop"})
    specs = [
        TaskSpec(id="ok-1", payload={"handler": "noop"}),
        TaskSpec(id="bad-class", task_class="warp"),
        TaskSpec(id="taken", payload={"handler": "fail"}),  # same id, other content
        TaskSpec(id="ok-2", payload={"handler": "noop"}),
    ]
    outcome = await orch.submit_tasks(specs)
    assert outcome[0] is None and outcome[3] is None
    assert isinstance(outcome[1], errors.SpecError) and outcome[1].field == "task_class"
    assert isinstance(outcome[2], errors.AlreadyExists)
    for task_id in ("ok-1", "ok-2"):
        assert (await orch.wait(task_id, timeout=30)).status == "completed"
    with pytest.raises(errors.NotFound):
        await orch.get_task_status("bad-class")
    # A malformed bulk body is refused whole, naming the field.
    err = await _status_of(orch.stub.submit_tasks(orch_pb.SubmitTasksRequest(tasks_json=b"[{")))
    assert err.status is Status.INVALID_ARGUMENT and "tasks_json" in (err.message or "")
