"""A backend body's Content-Encoding undone in bounded pieces (sans-I/O).

httpx's decoders unpack each read whole: one read of gzip can unpack to a thousand times
its size, nested or zstd bodies to gigabytes, all on the event loop and before any size
limit is checked. Here a read unpacks into pieces of at most ``PIECE_BYTES``, handed out
one at a time, so MAX_RESPONSE_BYTES and the error-body limit stop the unpacking within a
piece of the limit, and the reader (``netstream.DecodedBody``) lets other tasks run
between pieces.

The proxy asks backends for ``gzip, deflate`` only. Those are undone, nested up to
``MAX_CODINGS`` deep (zlib's ``max_length`` bounds what each call unpacks); any other
coding (``br``, ``zstd``, ``compress``, a name no one defines) is refused as a broken
answer: not asked for, and the decoders Python has for them cannot bound their output."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

PIECE_BYTES = 64 * 1024
MAX_CODINGS = 2

_GZIP_WBITS = zlib.MAX_WBITS | 16
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS


class ContentDecodingError(ValueError):
    """A body that cannot be decoded: an unsupported coding, or bytes that are not one."""


class _Inflater:
    """One gzip or deflate layer. ``deflate`` is meant to be zlib-wrapped, but some
    servers send raw deflate: as httpx (and browsers) do, a body whose first two bytes
    are not a zlib header is read as raw deflate (here also when they come in two reads).
    A gzip body may be several members one after another (RFC 1952 2.2; a server that
    compresses each event of a stream on its own sends that): each is undone in turn."""

    __slots__ = ("_after_end", "_gzip", "_head", "_inflate")

    def __init__(self, wbits: int, *, may_be_raw: bool = False) -> None:
        self._inflate = zlib.decompressobj(wbits)
        self._gzip = wbits == _GZIP_WBITS
        # a deflate body's first bytes, held until there are two to look at
        self._head: bytes | None = b"" if may_be_raw else None
        # after the end of a gzip member: what came since, held until two bytes tell
        # whether another member starts; None once they told it does not (all dropped)
        self._after_end: bytes | None = b""

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """What ``data`` unpacks to, ``PIECE_BYTES`` at most at a time. Bytes after the
        end of the coded stream that start no gzip member are dropped, as httpx drops
        them (not kept, as zlib would, for a body that never ends)."""
        if self._head is not None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return
            self._head = None
            if not _zlib_header(data):
                self._inflate = zlib.decompressobj(_RAW_DEFLATE_WBITS)
        while True:
            if self._inflate.eof:
                rest = self._next_member(data)
                if rest is None:
                    return
                data = rest
            out = self._unpack(data)
            if out:
                yield out
            if self._inflate.eof:
                data = self._inflate.unused_data
                continue
            data = self._inflate.unconsumed_tail
            if not data and len(out) < PIECE_BYTES:
                return  # all input taken and nothing held back: zlib wants more input

    def _next_member(self, data: bytes) -> bytes | None:
        """After the end of the coded stream: ``data`` as the start of the next gzip
        member, or None (held until it can tell, or dropped)."""
        if self._after_end is None or not self._gzip:
            return None
        data = self._after_end + data
        if len(data) < 2:
            self._after_end = data
            return None
        if not data.startswith(b"\x1f\x8b"):
            self._after_end = None  # trailing bytes, not a member: dropped from now on
            return None
        self._after_end = b""
        self._inflate = zlib.decompressobj(_GZIP_WBITS)
        return data

    def end(self) -> Iterator[bytes]:
        """What zlib still holds at the end of the body (nothing when it was drained)."""
        head, self._head = self._head, None
        if head:  # a single byte of deflate: not a zlib header
            self._inflate = zlib.decompressobj(_RAW_DEFLATE_WBITS)
            yield from self.pieces(head)
        try:
            out = self._inflate.flush()
        except zlib.error as exc:
            raise ContentDecodingError(f"the backend's body is not valid: {exc}") from None
        if out:
            yield out

    def _unpack(self, data: bytes) -> bytes:
        try:
            return self._inflate.decompress(data, PIECE_BYTES)
        except zlib.error as exc:
            raise ContentDecodingError(f"the backend's body is not valid: {exc}") from None


def _zlib_header(data: bytes) -> bool:
    """Whether ``data`` starts as a zlib stream does (zlib's own check of its header)."""
    try:
        zlib.decompressobj(_ZLIB_WBITS).decompress(data[:2])
    except zlib.error:
        return False
    return True


def _layer(coding: str) -> _Inflater:
    if coding in ("gzip", "x-gzip"):
        return _Inflater(_GZIP_WBITS)
    if coding == "deflate":
        return _Inflater(_ZLIB_WBITS, may_be_raw=True)
    raise ContentDecodingError(
        f"the backend answered in Content-Encoding {coding!r}, which the proxy did not ask "
        "for (it asks for gzip or deflate)"
    )


def codings_of(header: str) -> list[str]:
    """The codings a Content-Encoding header names, in the order they were applied,
    ``identity`` left out (it changes nothing)."""
    named = (coding.strip().lower() for coding in header.split(","))
    return [coding for coding in named if coding and coding != "identity"]


class ContentDecoder:
    """Undoes the codings of a Content-Encoding header: ``pieces(read)`` for each read of
    the body, then ``end()``; each yields pieces of at most ``PIECE_BYTES``."""

    __slots__ = ("_layers",)

    def __init__(self, header: str) -> None:
        codings = codings_of(header)
        if len(codings) > MAX_CODINGS:
            raise ContentDecodingError(
                f"the backend's body is encoded {len(codings)} times over "
                f"({header.strip()!r}); the proxy undoes at most {MAX_CODINGS}"
            )
        # the coding listed last was applied last: it is undone first
        self._layers = [_layer(coding) for coding in reversed(codings)]

    def pieces(self, data: bytes) -> Iterator[bytes]:
        return self._through(0, data)

    def end(self) -> Iterator[bytes]:
        for index, layer in enumerate(self._layers):
            for piece in layer.end():
                yield from self._through(index + 1, piece)

    def _through(self, index: int, data: bytes) -> Iterator[bytes]:
        if index == len(self._layers):
            if data:
                yield data
            return
        for piece in self._layers[index].pieces(data):
            yield from self._through(index + 1, piece)
