"""The orchestrator's hottest messages as classes of the official protobuf runtime (upb, in C).

betterproto2 decodes and encodes in Python: a ``SubmitAndWaitRequest`` with a two-entry map
took 20-40 us to parse and a ``TaskResult`` as long to serialize, on every call, on the event
loop. The same messages in upb take about a microsecond. The server uses these classes for
``SubmitTask`` and ``SubmitAndWait`` (``OrchestratorService.__mapping__``); the bytes on the
wire are the same protobuf either way (one ``.proto``, the contract).

The classes are built from the descriptor protoc wrote from ``orchestrator.proto``
(``_gen/orchestrator/v1/_descriptor.py``, regenerated with the rest by ``make proto``) in a
pool of their own, so they never clash with other code registering the same file in
protobuf's default pool (the official grpcio stubs of a client in the same process).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from ._gen.orchestrator.v1._descriptor import FILE_DESCRIPTOR_SET

__all__ = ["SubmitAndWaitRequest", "SubmitTaskRequest", "SubmitTaskResponse", "TaskResult"]


def _message_classes(*names: str) -> list[Any]:
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file:
        pool.Add(file)
    return [
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"orchestrator.v1.{n}")) for n in names
    ]


SubmitTaskRequest, SubmitTaskResponse, SubmitAndWaitRequest, TaskResult = _message_classes(
    "SubmitTaskRequest", "SubmitTaskResponse", "SubmitAndWaitRequest", "TaskResult"
)
