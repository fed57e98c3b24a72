"""The answers of the per-task calls (``SubmitTask``, ``SubmitTasks``, ``SubmitAndWait``)
leave the server in one socket write (headers, message, trailers; grpclib alone writes
three). That holding them back never reorders a connection's frames is checked through the
official grpcio client in ``test_rpc_interop.py``."""

from __future__ import annotations

from asyncio import selector_events
from pathlib import Path
from typing import Any

import pytest
from _rpc_support import in_process_server
from grpclib.client import Channel

from dspy_infra.models import TaskSpec
from dspy_infra.rpc.client import OrchestratorClient


async def test_a_submit_and_wait_answer_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with in_process_server(tmp_path / "s") as (_infra, server):
        port = server.grpc_port
        writes: list[int] = []
        transport_class: Any = selector_events._SelectorSocketTransport  # type: ignore[attr-defined]  # (private: no stub)
        real_write = transport_class.write

        def counting_write(self: Any, data: Any) -> None:
            if data and self.get_extra_info("sockname")[1] == port:  # the server's side
                writes.append(len(data))
            real_write(self, data)

        channel = Channel("127.0.0.1", port)
        client = OrchestratorClient(channel, "test", token=None, owns_channel=True)
        try:
            await client.submit_and_wait(TaskSpec("warm", payload={"handler": "noop"}))
            monkeypatch.setattr(transport_class, "write", counting_write)
            for i in range(5):
                writes.clear()
                result = await client.submit_and_wait(TaskSpec(f"t{i}", payload={"handler": "noop"}))
                assert str(result.status) == "completed"
                assert len(writes) == 1, f"the answer took {len(writes)} writes: {writes}"
        finally:
            monkeypatch.undo()
            channel.close()
