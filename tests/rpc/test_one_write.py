"""The answers of the per-task calls (``SubmitTask``, ``SubmitTasks``, ``SubmitAndWait``)
leave the server in one socket write (headers, message, trailers), and holding their frames
back never reorders a connection's frames: many such calls at once on one connection, next
to a server stream writing its own frames, all get their answers through the official
grpcio client (a frame out of order breaks the connection's header compression)."""

from __future__ import annotations

import json
import threading
from asyncio import selector_events
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from _adversarial import official_stubs
from _rpc_support import ServeProcess, in_process_server, serve_process
from grpclib.client import Channel

from dspy_infra.models import TaskSpec
from dspy_infra.rpc.client import OrchestratorClient


async def test_a_submit_and_wait_answer_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with in_process_server(tmp_path / "s") as (_infra, server):
        port = server.grpc_port
        writes: list[int] = []
        real_write = selector_events._SelectorSocketTransport.write

        def counting_write(self: Any, data: Any) -> None:
            if data and self.get_extra_info("sockname")[1] == port:  # the server's side
                writes.append(len(data))
            real_write(self, data)

        channel = Channel("127.0.0.1", port)
        client = OrchestratorClient(channel, "test", token=None, owns_channel=True)
        try:
            await client.submit_and_wait(TaskSpec("warm", payload={"handler": "noop"}))
            monkeypatch.setattr(selector_events._SelectorSocketTransport, "write", counting_write)
            for i in range(5):
                writes.clear()
                result = await client.submit_and_wait(TaskSpec(f"t{i}", payload={"handler": "noop"}))
                assert str(result.status) == "completed"
                assert len(writes) == 1, f"the answer took {len(writes)} writes: {writes}"
        finally:
            monkeypatch.undo()
            channel.close()


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ModuleType]]:
    with official_stubs(tmp_path_factory.mktemp("official_stubs")) as modules:
        yield modules


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with serve_process(tmp_path_factory.mktemp("serve")) as proc:
        yield proc


def test_held_answers_interleave_with_a_stream_on_one_connection(
    stubs: dict[str, Any], server: ServeProcess
) -> None:
    pb, pb_grpc = stubs["orch"], stubs["orch_grpc"]
    with grpc.insecure_channel(server.addr) as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        events = stub.StreamEvents(pb.StreamEventsRequest(), timeout=60)
        seen: list[str] = []

        def read_events() -> None:
            try:
                for event in events:
                    seen.append(event.event_type)
            except grpc.RpcError as exc:  # cancelled at the end of the test
                assert exc.code() == grpc.StatusCode.CANCELLED

        reader = threading.Thread(target=read_events)
        reader.start()
        try:
            calls = []
            for i in range(150):
                task = pb.SubmitTaskRequest(id=f"w{i}", payload={"handler": "noop"})
                calls.append(stub.SubmitAndWait.future(pb.SubmitAndWaitRequest(task=task), timeout=60))
                calls.append(
                    stub.SubmitTask.future(pb.SubmitTaskRequest(id=f"s{i}", payload={"handler": "noop"}))
                )
                batch = [{"id": f"b{i}-{k}", "payload": {"handler": "noop"}} for k in range(5)]
                calls.append(
                    stub.SubmitTasks.future(pb.SubmitTasksRequest(tasks_json=json.dumps(batch).encode()))
                )
            answers = [call.result(timeout=60) for call in calls]
        finally:
            events.cancel()
            reader.join(10)
        assert [a.status for a in answers[0::3]] == ["completed"] * 150
        assert all(a.success for a in answers[1::3])
        assert [(a.accepted, len(a.rejected)) for a in answers[2::3]] == [(5, 0)] * 150
        assert seen, "the event stream wrote its frames in between"
