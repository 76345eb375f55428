"""``python -m trioproxy.probe``: exit 0 when the proxy on this machine answers ``/health``
with a 2xx, 1 otherwise — a container's HEALTHCHECK (the slim image has no curl).

It reads the settings the proxy reads (the environment, and ``.env`` in the working
directory if there is one), so a proxy on another ``PROXY_PORT`` or serving HTTPS
(``TLS_CERTFILE``) is probed where it listens. A port given as ``--port`` on the command
line is not in the environment: in a container, set ``PROXY_PORT`` instead.
"""

from __future__ import annotations

import http.client
import ssl
import sys
import urllib.error
import urllib.request

from .config import ConfigError, Settings, load_settings

TIMEOUT_SECONDS = 3.0
# all interfaces: the probe knocks on the loopback one; "::" serves IPv4 too (cli.listen
# turns IPV6_V6ONLY off), and 127.0.0.1 is there in containers whose loopback has no ::1
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "127.0.0.1"}


def health_url(settings: Settings) -> str:
    host = _LOOPBACK.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.tls_certfile else "http"
    return f"{scheme}://{host}:{settings.port}{settings.root_path}/health"


def _context() -> ssl.SSLContext:
    # the certificate names the public host, not the loopback address knocked on here:
    # checking it would only make the probe fail
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def main() -> int:
    try:
        url = health_url(load_settings())
    except ConfigError as exc:
        print(f"trioproxy probe: {exc}", file=sys.stderr)
        return 1
    try:
        context = _context() if url.startswith("https:") else None
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS, context=context):
            return 0  # urlopen raises on any status that is not 2xx or 3xx
    except (urllib.error.URLError, OSError) as exc:
        print(f"trioproxy probe: {url}: {exc}", file=sys.stderr)
        return 1
    except (http.client.HTTPException, ValueError) as exc:
        # something else answers on the port (or half an answer): its bytes are in repr's
        # quotes, so the reason stays one line
        print(f"trioproxy probe: {url}: not an HTTP answer: {exc!r}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
