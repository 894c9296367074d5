"""A minimal QMP client: one JSON object per line over QEMU's UNIX socket.

>>> with QmpClient.connect(Path("/tmp/qmp.sock"), timeout=10) as qmp:
...     qmp.execute("dump-guest-memory", paging=False, protocol="file:/tmp/core")
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["QmpClient", "QmpError"]


class QmpError(RuntimeError):
    """QEMU answered a command with an error, or the connection failed."""


class QmpClient:
    """Synchronous QMP: ``execute`` sends one command and returns its ``return`` value."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self.events: list[dict[str, Any]] = []  # asynchronous events seen so far

    @classmethod
    def connect(cls, path: Path, timeout: float) -> QmpClient:
        """Connect (retrying until QEMU has created the socket), read the greeting, negotiate."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"no QMP socket at {path} after {timeout} s") from None
                time.sleep(0.05)
        client = cls(sock)
        greeting = client._read()
        if "QMP" not in greeting:
            client.close()
            raise QmpError(f"unexpected QMP greeting {greeting!r}")
        client.execute("qmp_capabilities")
        return client

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QmpError("QEMU closed the QMP connection")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command``; raise :class:`QmpError` with QEMU's description on failure."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
