"""Bringing a DPDK transport's data plane up: three internal frames on the TCP connection once
the client is authenticated, the agents they start, and the fallback to TCP (Note: [Data-plane
set-up]). A mixin of ``DpdkTransport`` (dpdk.py): it uses the transport's framing
(``_send_tcp``, ``_read_prefix``, ``_read_header``) and keeps its ``_plane``, ``_agent``,
``_copied_base`` and ``_agent_registrations``."""

from __future__ import annotations

import json
import logging
import os
import secrets

from genie.errors import GenieError, ProtocolError
from genie.runtime.transports.base import FRAME_MAGIC, PREFIX
from genie.runtime.transports.dpdk_agent import Agent, host_id

logger = logging.getLogger(__name__)

__all__ = ["DataPlaneSetup"]

# Note: [Data-plane set-up]
# The data plane opens once the client is authenticated, inside the client's ``recv_frame`` that
# reads AUTH_OK, with three internal frames the protocol layer never sees:
#   client -> SETUP      {"host": host id, "port": port kind}
#   server -> SETUP_OK   {"ok", "error", "socket", "host"}   (its agent is up, its port listens)
#   client -> SETUP_DONE {"ok", "error"}                     (its agent met the server's)
# Only an authenticated peer can make a server start an agent (SETUP before AUTH_OK is handed to
# the protocol layer, which refuses it). When either side cannot bring its agent up, or memif
# would need two hosts, both sides log why and carry payloads over TCP: TCP is the fallback.
# Once the data plane is up, a failure on it (a dead peer, a dead agent) is a TransportError, as
# a broken TCP connection is.

# Internal frame kinds (Note: [Data-plane set-up]); never returned by recv_frame.
_SETUP, _SETUP_OK, _SETUP_DONE = 0xD0, 0xD1, 0xD2
_INTERNAL = (_SETUP, _SETUP_OK, _SETUP_DONE)
_MAX_INTERNAL_HEADER = 4096


class DataPlaneSetup:
    """The set-up frames of a DPDK transport and what they start."""

    def _send_internal(self, kind: int, body: dict) -> None:
        header = json.dumps(body).encode()
        prefix = PREFIX.pack(FRAME_MAGIC, 1, kind, 0, len(header), 0)
        self._send_tcp([memoryview(prefix), memoryview(header)])

    def _setup_as_connector(self) -> None:
        self._plane = "pending"
        self._send_internal(_SETUP, {"v": 1, "host": host_id(), "port": self._config.port})
        _, kind, _, header_len, payload_len = self._read_prefix()
        if kind != _SETUP_OK or header_len > _MAX_INTERNAL_HEADER or payload_len:
            raise ProtocolError(
                f"genie: the server at {self._peer} does not run the DPDK transport (it answered "
                f"frame kind {kind}); start it with `genie serve --transport dpdk`, or connect "
                "with the tcp transport"
            )
        reply = self._parse_internal(self._read_header(header_len))
        if not reply.get("ok"):
            self._fall_back(f"the server could not start its data plane: {reply.get('error')}")
            return
        error = ""
        if self._config.is_memif and reply.get("host") != host_id():
            error = "memif connects processes on one host and the server is on another"
        else:
            try:
                self._agent = Agent(self._config, "client", reply.get("socket"))
                self._agent.wait("ready", self._config.connect_timeout)
                self._agent.ready = True
                self._agent_registrations = self._agent.registrations()
            except GenieError as e:
                error = self._start_error(e)
        self._send_internal(_SETUP_DONE, {"ok": not error, "error": error})
        if error:
            self._fall_back(error)
        else:
            self._plane = "up"
            logger.info("genie: DPDK data plane to %s is up", self._peer)

    def _setup_as_listener(self, request: dict) -> None:
        reply: dict = {"ok": False, "host": host_id()}
        if self._plane != "none":
            reply["error"] = "the data plane was set up already"
        elif self._config.is_memif and request.get("host") != host_id():
            reply["error"] = "memif connects processes on one host and the client is on another"
        else:
            name = f"genie-{os.getpid()}-{secrets.token_hex(6)}"
            try:
                self._agent = Agent(self._config, "server", name)
                self._agent.wait("port_up", self._config.connect_timeout)
                reply.update(ok=True, socket=name)
            except GenieError as e:
                reply["error"] = self._start_error(e)
        self._send_internal(_SETUP_OK, reply)
        if reply["ok"]:
            self._plane = "pending"
        else:
            self._fall_back(reply["error"])

    def _on_internal(self, kind: int, body: dict) -> None:
        if kind == _SETUP and self._side == "listener":
            self._setup_as_listener(body)
        elif kind == _SETUP_DONE and self._side == "listener" and self._plane == "pending":
            if body.get("ok"):
                self._plane = "up"
                logger.info("genie: DPDK data plane from %s is up", self._peer)
            else:
                self._fall_back(f"the client could not start its data plane: {body.get('error')}")
        else:
            raise ProtocolError(
                f"genie: unexpected data-plane set-up frame {kind} from {self._peer}"
            )

    def _drop_agent(self) -> None:
        c = self._agent.client.counters()
        out, into = self._copied_base
        self._copied_base = (out + int(c["copied_out"]), into + int(c["copied_in"]))
        self._agent.close()
        self._agent = None

    def _start_error(self, e: GenieError) -> str:
        died = self._agent.describe_exit() if self._agent is not None else ""
        if self._agent is not None:
            self._drop_agent()
        return died or str(e).removeprefix("genie: ")

    def _parse_internal(self, header: bytes) -> dict:
        try:
            body = json.loads(header)
        except ValueError:
            raise ProtocolError(
                f"genie: malformed data-plane set-up frame from {self._peer}"
            ) from None
        if not isinstance(body, dict):
            raise ProtocolError(f"genie: malformed data-plane set-up frame from {self._peer}")
        return body

    def _fall_back(self, why: str) -> None:
        self._plane = "tcp"
        if self._agent is not None:
            self._drop_agent()
        logger.warning(
            "genie: no DPDK data plane to %s (%s); payloads go over TCP", self._peer, why
        )
