"""``GET /api/v1/events``: the event bus as Server-Sent Events, resumable.

Each event goes as ``id: EPOCH-SEQ`` + ``data: {json}``; a client that reconnects with
``Last-Event-ID`` gets every kept event after that one (the bus's sequence numbers), or an
``events_dropped`` event when some have left the bus's history meanwhile. An id from another
server process (another epoch) cannot be resumed: the stream starts with a ``stream_reset``
event (re-read the state), then goes on live.

Bounded: one bus cursor and a buffer of ``BUFFER`` events per stream; a client that reads
slowly falls behind on the bus (and is told what it missed), it never grows memory. The
stream ends when the client leaves (noticed at the next write; a comment line is written
every ``KEEPALIVE`` seconds), when the bus closes, and when the server shuts down.

Plain SSE framing rather than a library: it is a dozen lines, and the console reads the
stream with ``fetch`` (which can send the ``Authorization`` header, unlike ``EventSource``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re

import anyio
from aiohttp import web

from ..errors import SpecError, Unavailable
from ..models import Event
from ..values import check_text, preview
from .state import CONSOLE_KEY, INFRA_KEY

__all__ = ["BUFFER", "KEEPALIVE", "MAX_STREAMS", "events_stream", "frame"]

#: Events buffered between the bus and one client's socket.
BUFFER = 256
#: Seconds between keep-alive comments (they also detect a client that left).
KEEPALIVE = 5.0
#: Event streams one server keeps open at once (each holds a cursor, a buffer and a socket).
MAX_STREAMS = 64
_LAST_ID = re.compile(r"([0-9a-f]{1,32})-([0-9]{1,18})")


def frame(event_id: str | None, event: Event, seq: int) -> bytes:
    """One SSE event; without ``event_id`` no ``id:`` line (the client keeps its last id)."""
    data = json.dumps(
        {
            "seq": seq,
            "type": event.type,
            "resource_id": event.resource_id,
            "data": event.data,
            "timestamp": event.timestamp,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    # json.dumps escapes newlines inside strings, so the data is one line.
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {data}\n\n".encode()


def _types(request: web.Request) -> list[str] | None:
    raw = request.query.get("types", "")
    if not raw:
        return None
    names = [check_text(t.strip(), "types") for t in raw.split(",") if t.strip()]
    if len(names) > 64:
        raise SpecError("at most 64 event types", field="types")
    return names or None


def _since(request: web.Request) -> float | None:
    raw = request.query.get("since")
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1e11:  # also refuses nan and inf
        raise SpecError(f"must be a Unix time in seconds, got {preview(raw)}", field="since")
    return value


async def events_stream(request: web.Request) -> web.StreamResponse:
    infra = request.app[INFRA_KEY]
    console = request.app[CONSOLE_KEY]
    if console.open_streams >= MAX_STREAMS:
        raise Unavailable(
            f"{MAX_STREAMS} event streams are open already",
            fix="close another console tab or stream (each page needs one), then reconnect",
        )
    types = _types(request)
    since = _since(request)
    last = request.headers.get("Last-Event-ID", "").strip()
    after: int | None = None
    reset = False
    if last:
        match = _LAST_ID.fullmatch(last)
        if match and match[1] == console.epoch:
            after = int(match[2])
        else:
            reset = True
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # a proxy must not hold events back
        }
    )
    console.open_streams += 1  # before the first await: the cap holds for concurrent opens
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        if reset:
            gone = Event("stream_reset", "", {"last_event_id": preview(last, 80)}, 0.0)
            # No id: resuming from here must not replay this process's whole history.
            await response.write(frame(None, gone, -1))
        await _relay(request, response, infra.bus, console.epoch, console.stopping, types, since, after)
    except ConnectionError:
        pass  # the client left before the stream began
    finally:
        console.open_streams -= 1
    return response


async def _relay(
    request: web.Request,
    response: web.StreamResponse,
    bus: object,
    epoch: str,
    stopping: asyncio.Event,
    types: list[str] | None,
    since: float | None,
    after: int | None,
) -> None:
    from ..events import EventBus

    assert isinstance(bus, EventBus)
    send, receive = anyio.create_memory_object_stream[tuple[int, Event]](BUFFER)

    async def pump() -> None:
        async with send:
            async for item in bus.subscribe_numbered(types, since=since, after=after):
                await send.send(item)

    async def stop_on_shutdown(scope: anyio.CancelScope) -> None:
        await stopping.wait()
        scope.cancel()

    async with anyio.create_task_group() as tg, receive:
        tg.start_soon(pump)
        tg.start_soon(stop_on_shutdown, tg.cancel_scope)
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            item: tuple[int, Event] | None = None
            with anyio.move_on_after(KEEPALIVE):
                try:
                    item = await receive.receive()
                except anyio.EndOfStream:
                    break  # the bus closed
            if item is None:
                data = b": keepalive\n\n"
            else:
                data = frame(f"{epoch}-{item[0]}", item[1], item[0])
            try:
                await response.write(data)
            except ConnectionError:
                break  # the client left
        tg.cancel_scope.cancel()
    with contextlib.suppress(Exception):
        await response.write_eof()
