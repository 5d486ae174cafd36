"""Writing answers, well or (under a fault) badly.

Every answer goes through :func:`send`, which applies the request's *after*
fault if it has one: reset the connection instead of answering, hold the
answer, trickle or cut its body, or break its JSON. Status counters are kept
here, with 0 for a connection closed without any answer.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping

from aiohttp import web

from wanbatch.sim.faults import Fault
from wanbatch.sim.state import SimState

__all__ = ["json_headers", "reset", "send"]

_CHUNKS = 8  #: a slow body arrives in this many pieces


def json_headers(request_id: str) -> dict[str, str]:
    """The gateway's headers, where cheap to imitate (``req-cost-time`` is added when the answer is ready)."""
    return {
        "Content-Type": "application/json",
        "Server": "istio-envoy",
        "x-request-id": request_id,
        "x-dashscope-call-gateway": "true",
    }


def reset(request: web.Request) -> None:
    """Drop the connection with a TCP reset, no answer at all."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Zero linger turns the close into an RST, as a crashed gateway would send.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def send(
    request: web.Request,
    state: SimState,
    endpoint: str,
    status: int,
    payload: bytes,
    headers: Mapping[str, str],
    fault: Fault | None = None,
) -> web.StreamResponse:
    """Answer ``payload`` with ``status``, damaged as ``fault`` says (only after-kind faults act here)."""
    if fault is Fault.RESET_AFTER:
        state.faults_injected[fault] += 1
        state.statuses[(endpoint, 0)] += 1
        reset(request)
        return web.Response()
    state.statuses[(endpoint, status)] += 1
    if fault is Fault.HOLD_RESPONSE:
        state.faults_injected[fault] += 1
        await state.sleep_until(state.clock.now() + state.config.hold_s)
    elif fault is Fault.MALFORMED_JSON:
        state.faults_injected[fault] += 1
        payload = payload[: max(1, len(payload) // 2)]
    elif fault in (Fault.SLOW_BODY, Fault.SLOW_DOWNLOAD, Fault.TRUNCATED_BODY, Fault.TRUNCATED_DOWNLOAD):
        state.faults_injected[fault] += 1
        return await _stream(request, state, status, payload, headers, fault)
    return web.Response(status=status, body=payload, headers=headers)


async def _stream(
    request: web.Request, state: SimState, status: int, payload: bytes, headers: Mapping[str, str], fault: Fault
) -> web.StreamResponse:
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = len(payload)
    await response.prepare(request)
    if fault in (Fault.TRUNCATED_BODY, Fault.TRUNCATED_DOWNLOAD):
        await response.write(payload[: len(payload) // 2])
        # A plain close (not a reset) delivers the half that was written before the FIN.
        if request.transport is not None:
            request.transport.close()
        return response
    step = max(1, -(-len(payload) // _CHUNKS))
    pause_s = state.config.slow_body_s / _CHUNKS
    for start in range(0, len(payload), step):
        await response.write(payload[start : start + step])
        if not await state.sleep_until(state.clock.now() + pause_s):
            break
    await response.write_eof()
    return response
