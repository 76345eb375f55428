"""A backend body's Content-Encoding undone in bounded pieces (``content_coding``) and its
trio reader (``netstream.DecodedBody``). A review found one 590-byte answer
(``Content-Encoding: gzip, gzip``) unpacked to 256 MB in one httpx decoder call, and a
zstd one to gigabytes, before MAX_RESPONSE_BYTES was looked at, on the event loop."""

from __future__ import annotations

import functools
import gzip
import itertools
import zlib
from collections.abc import Awaitable, Callable

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy import netstream
from trioproxy.content_coding import (
    MAX_CODINGS,
    PIECE_BYTES,
    ContentDecoder,
    ContentDecodingError,
    codings_of,
)


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1)


def _zlib(data: bytes) -> bytes:
    return zlib.compress(data, 1)


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


_ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": _gzip,
    "x-gzip": _gzip,
    "deflate": _zlib,
    "raw-deflate": _raw_deflate,  # sent as "deflate" by some servers
}


def _zeros_gzipped_twice(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    inner = b"".join(packer.compress(block) for _ in range(size >> 20)) + packer.flush()
    return gzip.compress(inner)


@functools.cache
def bomb() -> bytes:
    """256 MiB of zeros, gzipped twice: under a kilobyte."""
    return _zeros_gzipped_twice(256 << 20)


def _decode_all(header: str, reads: list[bytes]) -> list[bytes]:
    decoder = ContentDecoder(header)
    pieces = [piece for data in reads for piece in decoder.pieces(data)]
    return pieces + list(decoder.end())


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=150, deadline=None)
@given(
    body=st.one_of(st.binary(max_size=2000), st.builds(bytes, st.integers(0, 300_000))),
    codings=st.lists(st.sampled_from(sorted(_ENCODERS)), min_size=1, max_size=MAX_CODINGS),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_any_coding_chain_and_any_split_gives_the_body_back_in_bounded_pieces(
    body: bytes, codings: list[str], cuts: list[int]
) -> None:
    encoded = body
    for coding in codings:
        encoded = _ENCODERS[coding](encoded)
    header = ", ".join("deflate" if c == "raw-deflate" else c for c in codings)
    pieces = _decode_all(header, _split(encoded, cuts))
    assert b"".join(pieces) == body
    assert all(0 < len(piece) <= PIECE_BYTES for piece in pieces)


@settings(max_examples=100, deadline=None)
@given(
    members=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
    junk=st.binary(max_size=40).filter(lambda junk: not junk.startswith(b"\x1f")),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_gzip_members_one_after_another_are_each_undone(
    members: list[bytes], junk: bytes, cuts: list[int]
) -> None:
    """RFC 1952 2.2: a gzip body may be several members (each event of a stream gzipped
    on its own, say); httpx stopped after the first. Bytes after the last member that do
    not start another are dropped, as before."""
    encoded = b"".join(_gzip(member) for member in members) + junk
    pieces = _decode_all("gzip", _split(encoded, cuts))
    assert b"".join(pieces) == b"".join(members)


def test_a_bomb_unpacks_only_as_far_as_it_is_read() -> None:
    decoder = ContentDecoder("gzip, gzip")
    pieces = decoder.pieces(bomb())  # the whole body in one read
    first = [next(pieces) for _ in range(3)]
    assert [len(piece) for piece in first] == [PIECE_BYTES] * 3
    assert first[0] == bytes(PIECE_BYTES)


def test_the_whole_bomb_is_still_its_true_size_when_read_to_the_end() -> None:
    assert sum(len(piece) for piece in _decode_all("gzip, gzip", [bomb()])) == 256 << 20


@pytest.mark.parametrize("header", ["br", "zstd", "compress", "gzip, br", "aes128gcm"])
def test_codings_not_asked_for_are_refused_by_name(header: str) -> None:
    with pytest.raises(ContentDecodingError, match="did not ask for"):
        ContentDecoder(header)


def test_more_codings_than_undone_are_refused() -> None:
    with pytest.raises(ContentDecodingError, match="3 times"):
        ContentDecoder("gzip, gzip, gzip")


@pytest.mark.parametrize(
    ("header", "codings"),
    [
        ("identity", []),
        ("", []),
        (" GZIP ", ["gzip"]),
        ("identity, gzip", ["gzip"]),
        ("deflate,gzip", ["deflate", "gzip"]),
    ],
)
def test_header_spellings(header: str, codings: list[str]) -> None:
    assert codings_of(header) == codings


def test_bytes_that_are_not_the_coding_are_an_error() -> None:
    with pytest.raises(ContentDecodingError, match="not valid"):
        _decode_all("gzip", [b"\x1f\x8b\x08\x00not gzip at all"])
    with pytest.raises(ContentDecodingError, match="not valid"):
        _decode_all("deflate", [b"\xff" * 8])  # neither zlib nor raw deflate (block type 3)


def test_what_follows_the_end_of_the_coded_body_is_dropped_not_kept() -> None:
    decoder = ContentDecoder("gzip")
    assert b"".join(decoder.pieces(_gzip(b"answer") + b"trailing")) == b"answer"
    for _ in range(1000):  # a backend that goes on sending: nothing piles up
        assert list(decoder.pieces(b"x" * 65536)) == []
    assert list(decoder.end()) == []


# -- the trio reader ------------------------------------------------------------------


def _reader_of(
    reads: list[bytes], header: str
) -> tuple[Callable[[], Awaitable[bytes | None]], httpx.Response]:
    response = httpx.Response(
        200,
        headers={"Content-Encoding": header},
        stream=httpx.ByteStream(b"".join(reads)),
        request=httpx.Request("POST", "http://127.0.0.1/v1/chat/completions"),
    )
    given_reads = iter(reads)

    async def read_raw() -> bytes | None:
        await trio.lowlevel.checkpoint()
        return next(given_reads, None)

    return netstream.DecodedBody(response, read_raw, header).read, response


async def test_other_tasks_run_between_the_pieces_of_one_read() -> None:
    read, _ = _reader_of([bomb()], "gzip, gzip")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        seen = []
        for _ in range(50):
            await read()
            seen.append(ticks)
        nursery.cancel_scope.cancel()
    assert (
        seen[-1] - seen[1] >= 24
    )  # without a checkpoint per piece: 0 (trio may order a round either way)


async def test_the_reader_gives_the_body_and_then_none() -> None:
    body = b"data: x\n\n" * 50_000
    encoded = _gzip(body)
    read, _ = _reader_of([encoded[:100], encoded[100:]], "gzip")
    parts = []
    while (part := await read()) is not None:
        parts.append(part)
    assert b"".join(parts) == body
    assert await read() is None


async def test_a_decoding_error_is_httpxs_and_closes_the_response() -> None:
    read, response = _reader_of([b"not zstd"], "zstd")
    with pytest.raises(httpx.DecodingError, match="'zstd'"):
        await read()
    assert response.is_closed
    read, response = _reader_of([_gzip(b"")[:10] + b"\xff" * 8], "gzip")
    with pytest.raises(httpx.DecodingError, match="not valid"):
        await read()
    assert response.is_closed


def test_body_reader_decodes_an_encoded_body_itself() -> None:
    body = b'{"ok": true}'
    response = httpx.Response(
        200,
        headers={"Content-Encoding": "gzip"},
        stream=httpx.ByteStream(_gzip(body)),
        request=httpx.Request("GET", "http://127.0.0.1/"),
    )
    read = netstream.body_reader(response)
    assert isinstance(read.__self__, netstream.DecodedBody)  # type: ignore[attr-defined]

    async def whole() -> bytes:
        parts = []
        while (part := await read()) is not None:
            parts.append(part)
        return b"".join(parts)

    assert trio.run(whole) == body
