"""The standard ``grpc.health.v1.Health`` service (``Check`` and ``Watch``) on betterproto2
messages, so serving it does not import protobuf (issue 11: grpclib's own ``Health`` loads
``google.protobuf`` and its descriptor pool, about 45 ms of ``dspy-infra serve``'s start).

Same answers as grpclib's ``Health()`` without checks: the whole server (service ``""``) is
``SERVING``; any other name is unknown (``Check``: NOT_FOUND, ``Watch``: ``SERVICE_UNKNOWN``,
then the stream stays open, as the protocol asks). The messages are the two of
``grpc/health/v1/health.proto``; ``status`` is an enum there, an int32 here: the same varint
on the wire.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import betterproto2
import grpclib.const
import grpclib.server
from grpclib.const import Status

__all__ = [
    "NOT_SERVING",
    "SERVICE_UNKNOWN",
    "SERVING",
    "UNKNOWN",
    "Health",
    "HealthCheckRequest",
    "HealthCheckResponse",
]

#: ``HealthCheckResponse.ServingStatus`` values.
UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN = 0, 1, 2, 3

#: The service name that stands for the whole server.
_OVERALL = ""


@dataclass(eq=False, repr=False)
class HealthCheckRequest(betterproto2.Message):
    service: str = betterproto2.field(1, betterproto2.TYPE_STRING)


@dataclass(eq=False, repr=False)
class HealthCheckResponse(betterproto2.Message):
    status: int = betterproto2.field(1, betterproto2.TYPE_INT32)


_Stream = grpclib.server.Stream[HealthCheckRequest, HealthCheckResponse]


class Health:
    """``grpc.health.v1.Health``: the server is serving while it answers."""

    async def check(self, stream: _Stream) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.service != _OVERALL:
            await stream.send_trailing_metadata(status=Status.NOT_FOUND)
            return
        await stream.send_message(HealthCheckResponse(status=SERVING))

    async def watch(self, stream: _Stream) -> None:
        request = await stream.recv_message()
        assert request is not None
        status = SERVING if request.service == _OVERALL else SERVICE_UNKNOWN
        await stream.send_message(HealthCheckResponse(status=status))
        # The status never changes while the server runs: the stream stays open until the
        # client leaves or the server stops (which cancels this call).
        await asyncio.Event().wait()

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        def handler(func: Any, cardinality: grpclib.const.Cardinality) -> grpclib.const.Handler:
            return grpclib.const.Handler(func, cardinality, HealthCheckRequest, HealthCheckResponse)

        return {
            "/grpc.health.v1.Health/Check": handler(self.check, grpclib.const.Cardinality.UNARY_UNARY),
            "/grpc.health.v1.Health/Watch": handler(self.watch, grpclib.const.Cardinality.UNARY_STREAM),
        }
