"""uvicorn's WebSocket protocol, less the error it logs for every handshake answered by HTTP."""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

__all__ = ["WS_PROTOCOL", "WebSocketProtocol"]

# For `uvicorn.run(ws=...)`: an import string, so worker processes find it too.
WS_PROTOCOL = "pglayer._ws:WebSocketProtocol"


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """A handshake refused with an HTTP response (ASGI's denial response: pglayer's problem
    before `accept`, a 404 where no WebSocket route is) has ended: uvicorn took it for an
    app that never answered and logged "ASGI callable returned without completing
    handshake" at ERROR, so every stray probe fired the alerts on errors."""

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True
