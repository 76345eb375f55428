"""Small fakes for tests: an HTTP/1.1 handler that answers whatever a test scripts,
serving one in a thread of its own, a SOCKS5 proxy, and a cgroup filesystem tree."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar


class ScriptedHandler(BaseHTTPRequestHandler):
    """Quiet HTTP/1.1; ``json_body()`` reads the request, ``answer()`` writes a reply."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def json_body(self) -> Any:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def answer(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(OSError):  # the proxy may have given up already
            self.wfile.write(body)


# Two models as llama.cpp's server lists them (its /v1/models: the GGUF's metadata under
# "meta"), under the demo's names so the client scenarios that ask for those can run
LLAMA_CPP_META = {
    "demo-chat": {"vocab_type": 2, "n_vocab": 128256, "n_ctx_train": 131072, "n_embd": 4096,
                  "n_params": 8030261248, "size": 4912898304},
    "demo-embed": {"vocab_type": 3, "n_vocab": 30522, "n_ctx_train": 2048, "n_embd": 768,
                   "n_params": 136727040, "size": 274290560},
}  # fmt: skip
# what the same answer lists in Ollama's shape beside "data" (its top-level "models"): the
# server says "multimodal" for a model loaded with a projector (--mmproj), here demo-chat
LLAMA_CPP_CAPABILITIES = {"demo-chat": ["completion", "multimodal"], "demo-embed": ["completion"]}


class LlamaCppModels(ScriptedHandler):
    """A backend that lists models as llama.cpp's server does (LLAMA_CPP_META, and
    LLAMA_CPP_CAPABILITIES in the Ollama-style entries it sends beside them)."""

    def do_GET(self) -> None:
        entries = [
            {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "llamacpp",
             "meta": meta}
            for name, meta in LLAMA_CPP_META.items()
        ]  # fmt: skip
        ollama_style = [
            {"name": name, "model": name, "modified_at": "", "size": "", "digest": "",
             "type": "model", "description": "", "tags": [""], "capabilities": capabilities,
             "parameters": "", "details": {"parent_model": "", "format": "gguf", "family": "",
             "families": [""], "parameter_size": "", "quantization_level": ""}}
            for name, capabilities in LLAMA_CPP_CAPABILITIES.items()
        ]  # fmt: skip
        body = {"models": ollama_style, "object": "list", "data": entries}
        self.answer(200, json.dumps(body).encode())


# every input's vector from FullLengthEmbeddings: unit length, 8 dimensions
FULL_LENGTH_VECTOR = [8**-0.5] * 8


class FullLengthEmbeddings(ScriptedHandler):
    """Lists ``demo-embed`` and embeds every input as FULL_LENGTH_VECTOR, whatever
    ``dimensions`` asks (llama.cpp's server ignores it); with ``refuses`` set it refuses
    ``dimensions`` instead, in OpenAI's words for a model without it. ``asked`` holds
    the bodies it was sent."""

    refuses: ClassVar[bool] = False
    asked: ClassVar[list[dict[str, Any]]] = []

    def do_GET(self) -> None:
        self.answer(200, b'{"object": "list", "data": [{"id": "demo-embed"}]}')

    def do_POST(self) -> None:
        body = self.json_body()
        type(self).asked.append(body)
        if self.refuses and "dimensions" in body:
            error = {"message": "This model does not support specifying dimensions.",
                     "type": "invalid_request_error", "param": None, "code": None}  # fmt: skip
            self.answer(400, json.dumps({"error": error}).encode())
            return
        data = [{"object": "embedding", "index": index, "embedding": FULL_LENGTH_VECTOR}
                for index, _ in enumerate(body["input"])]  # fmt: skip
        usage = {"prompt_tokens": len(data), "total_tokens": len(data)}
        answer = {"object": "list", "data": data, "model": body["model"], "usage": usage}
        self.answer(200, json.dumps(answer).encode())


class QuietHTTPServer(ThreadingHTTPServer):
    """A test backend whose client may leave mid-answer (a proxy stopped during its
    readiness check) without a traceback: printed from the handler's thread, it lands in
    whichever test captures stderr then, and fails one that reads its own stderr."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """The handler on 127.0.0.1 in a thread; yields its base URL (ending in /v1)."""
    server = QuietHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def socks5_proxy() -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """A SOCKS5 proxy (no authentication, CONNECT only) on 127.0.0.1 in threads; yields
    its URL and the list of (host, port) it was asked to connect to."""
    listener = socket.create_server(("127.0.0.1", 0))
    targets: list[tuple[str, int]] = []

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def serve(client: socket.socket) -> None:
        with client:
            _, count = _exactly(client, 2)
            _exactly(client, count)  # the methods offered; "no authentication" is taken
            client.sendall(b"\x05\x00")
            _, _, _, kind = _exactly(client, 4)
            if kind == 1:
                host = socket.inet_ntoa(_exactly(client, 4))
            else:  # 3: a name
                host = _exactly(client, _exactly(client, 1)[0]).decode()
            port = int.from_bytes(_exactly(client, 2), "big")
            targets.append((host, port))
            with socket.create_connection((host, port)) as upstream:
                client.sendall(b"\x05\x00\x00\x01" + bytes(6))
                back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
                back.start()
                pipe(client, upstream)
                back.join(timeout=30)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                threading.Thread(target=serve, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"socks5://127.0.0.1:{listener.getsockname()[1]}", targets
    finally:
        listener.close()


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            raise OSError("the client closed the connection")
        data += piece
    return data


# --------------------------------------------------------------------------- cgroups

_MiB = 1024**2


def v2_mount(root: str = "/", point: str = "/sys/fs/cgroup") -> str:
    """A /proc/self/mountinfo line: ID PARENT MAJ:MIN ROOT POINT OPTIONS OPTIONAL - FSTYPE
    SOURCE SUPER_OPTIONS."""
    return f"29 23 0:26 {root} {point} rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


# a v2 cgroup with every figure: 200 MiB working set of 512 MiB, 1.5 cores, 30 % throttled
V2_FILES = {
    "memory.current": str(300 * _MiB),
    "memory.max": str(512 * _MiB),
    "memory.stat": f"anon 1\nfile 2\nactive_file 3\ninactive_file {100 * _MiB}\n",
    "memory.events": "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n",
    "cpu.max": "150000 100000",
    "cpu.stat": (
        "usage_usec 12500000\nuser_usec 1\nsystem_usec 2\n"
        "nr_periods 1000\nnr_throttled 300\nthrottled_usec 2500000\n"
    ),
}


def make_tree(root: Path, cgroup: str, mountinfo: str, dirs: dict[str, dict[str, str]]) -> Path:
    """A fake filesystem: /proc/self/{cgroup,mountinfo} and ``dirs`` {path: {file: text}}."""
    proc = root / "proc" / "self"
    proc.mkdir(parents=True, exist_ok=True)
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo)
    for directory, files in dirs.items():
        d = root / directory.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (d / name).write_text(text)
    return root
