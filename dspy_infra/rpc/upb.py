"""The orchestrator's hottest messages as classes of the official protobuf runtime (upb, in C).

betterproto2 decodes and encodes in Python: parsing a ``SubmitAndWaitRequest`` with a small
map took 40-200 us on the busy 2-core test machine and serializing a ``TaskResult`` about as
long, on every call, on the event loop; upb takes about a microsecond for either. The server
uses these classes for ``SubmitTask``, ``SubmitAndWait`` and ``SubmitTasks``
(``OrchestratorService.__mapping__``), ``OrchestratorClient`` for ``submit`` and
``submit_and_wait``; the bytes on the wire are the same protobuf either way (one ``.proto``,
the contract).

The classes are built from the descriptor protoc wrote from ``orchestrator.proto``
(``_gen/orchestrator/v1/_descriptor.py``, regenerated with the rest by ``make proto``) in a
pool of their own, so they never clash with other code registering the same file in
protobuf's default pool (the official grpcio stubs of a client in the same process).
Imported on first use only (``convert.upb_messages``): it loads google.protobuf.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from ._gen.orchestrator.v1._descriptor import FILE_DESCRIPTOR_SET

__all__ = [
    "SubmitAndWaitRequest",
    "SubmitTaskRequest",
    "SubmitTaskResponse",
    "SubmitTasksRequest",
    "SubmitTasksResponse",
    "TaskResult",
]


def _message_classes(*names: str) -> list[Any]:
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file:
        pool.Add(file)
    return [
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"orchestrator.v1.{n}")) for n in names
    ]


(
    SubmitTaskRequest,
    SubmitTaskResponse,
    SubmitAndWaitRequest,
    TaskResult,
    SubmitTasksRequest,
    SubmitTasksResponse,
) = _message_classes(
    "SubmitTaskRequest",
    "SubmitTaskResponse",
    "SubmitAndWaitRequest",
    "TaskResult",
    "SubmitTasksRequest",
    "SubmitTasksResponse",
)
