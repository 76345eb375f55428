"""The backend API key is masked in reply bodies that arrive in pieces (``SecretMask``):
wherever the reads split the body, the client gets exactly what masking the whole body
would give, and nothing is held back that could not be the start of the key."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import trio
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.errors import SecretMask
from trioproxy.exchange import Reply, masked

KEY = b"sk-proj-abc123"


def _pieces(body: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(body) + 1) for c in cuts}), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


def _masked_in_pieces(secret: bytes, pieces: list[bytes]) -> list[bytes]:
    mask = SecretMask(secret)
    out = [mask.feed(piece) for piece in pieces]
    return [*out, mask.flush()]


@given(
    secret=st.binary(min_size=1, max_size=5).map(lambda b: bytes(97 + x % 3 for x in b)),
    body=st.binary(max_size=40).map(lambda b: bytes(97 + x % 3 for x in b)),
    cuts=st.lists(st.integers(0, 1000), max_size=12),
)
def test_any_split_masks_like_the_whole_body(secret: bytes, body: bytes, cuts: list[int]) -> None:
    # a three-letter alphabet makes occurrences, overlaps and partial matches frequent
    out = _masked_in_pieces(secret, _pieces(body, cuts))
    assert b"".join(out) == body.replace(secret, b"***")


def test_a_key_split_across_reads_is_masked() -> None:
    body = b'data: {"text":"the key is ' + KEY + b' ok"}\n\n'
    for at in range(len(body) + 1):
        out = _masked_in_pieces(KEY, [body[:at], body[at:]])
        assert KEY not in b"".join(out)
        assert b"".join(out) == body.replace(KEY, b"***")


def test_only_a_possible_start_of_the_key_is_held_back() -> None:
    mask = SecretMask(KEY)
    assert mask.feed(b'data: {"x":1}\n\n') == b'data: {"x":1}\n\n'  # nothing held
    assert mask.feed(b"ends with sk-pr") == b"ends with "  # could be the key
    assert mask.feed(b"ank") == b"sk-prank"  # was not: out at once
    assert mask.feed(b"s") == b""
    assert mask.flush() == b"s"


async def test_a_streamed_reply_is_masked_across_reads() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"key: " + KEY[:5]
        await trio.lowlevel.checkpoint()
        yield KEY[5:] + b"\n"
        yield KEY[:3]  # the stream ends inside what looks like the key

    reply = masked(Reply(200, body()), KEY)
    chunks = [chunk async for chunk in reply.body]  # type: ignore[union-attr]
    assert chunks == [b"key: ", b"***\n", KEY[:3]]
