"""Imported first by a proxy process a test starts (``python -c``): its host name lookups of
``*.invalid`` names (RFC 6761: never a real name) fail as a resolver answers them, without
asking one, so no query leaves the machine. ``flaky-dns.invalid`` gets EAI_AGAIN (a DNS
server that did not answer), any other such name EAI_NONAME (no such name). The stub sits
at the lowest layer the proxy uses: ``socket.getaddrinfo``, which trio calls in a thread."""

from __future__ import annotations

import socket
from typing import Any

_real_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(
    host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
) -> Any:
    name = host.decode() if isinstance(host, bytes) else host
    # trio first asks for a numeric address only: answered locally, as the real one does
    if isinstance(name, str) and name.endswith(".invalid") and not flags & socket.AI_NUMERICHOST:
        if name.startswith("flaky-dns."):
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return _real_getaddrinfo(host, port, family, type, proto, flags)


socket.getaddrinfo = _getaddrinfo

# the command line a test spawns (conftest._spawn) to run the proxy with this stub
PROXY_WITH_STUB = [
    "-c",
    "import tests.dns_stub; from trioproxy._entry import main; raise SystemExit(main())",
]
