"""The backend API key is masked in reply bodies that arrive in pieces (``SecretsMask``):
wherever the reads split the body, the client gets exactly what masking the whole body
would give, and nothing is held back that could not be the start of the key."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import AsyncIterator

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trioproxy import exchange
from trioproxy.config import Settings, basic_credential
from trioproxy.errors import BackendSecrets, SecretsMask
from trioproxy.exchange import Reply, masked

KEY = b"sk-proj-abc123"


def _pieces(body: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(body) + 1) for c in cuts}), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


def _streamed(secrets: BackendSecrets, body: bytes, cuts: list[int]) -> bytes:
    """``body`` through a stream mask, in the reads ``cuts`` makes, and what it held."""
    mask = secrets.stream_mask()
    return b"".join([*(mask.feed(piece) for piece in _pieces(body, cuts)), mask.flush()])


def _masked_in_pieces(secret: bytes, pieces: list[bytes]) -> list[bytes]:
    mask = SecretsMask((secret,))
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
    mask = SecretsMask((KEY,))
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

    reply = masked(Reply(200, body()), BackendSecrets.of(KEY.decode()))
    chunks = [chunk async for chunk in reply.body]  # type: ignore[union-attr]
    assert chunks == [b"key: ", b"***\n", KEY[:3]]


_ABC = st.binary(max_size=40).map(lambda b: bytes(97 + x % 3 for x in b))


@given(
    secrets=st.lists(
        st.binary(min_size=1, max_size=5).map(lambda b: bytes(97 + x % 3 for x in b)),
        min_size=2,
        max_size=3,
        unique=True,
    ),
    body=_ABC,
    cuts=st.lists(st.integers(0, 1000), max_size=12),
)
def test_several_secrets_split_anyhow_mask_like_the_whole_body(
    secrets: list[bytes], body: bytes, cuts: list[int]
) -> None:
    """The API key and the URL's credentials together: secrets that overlap, or that
    start one another (``ab`` and ``abc``), come out as masking the whole body gives."""
    whole = BackendSecrets(replies=tuple(secrets))
    mask = whole.stream_mask()
    assert isinstance(mask, SecretsMask)
    out = [mask.feed(piece) for piece in _pieces(body, cuts)]
    assert b"".join([*out, mask.flush()]) == whole.mask_body(body)


def test_several_secrets_hold_back_only_a_possible_start() -> None:
    mask = SecretsMask((b"sk-proj-abc123", b"c3ZjdXNlcjpw"))
    assert mask.feed(b'data: {"x":1}\n\n') == b'data: {"x":1}\n\n'
    assert mask.feed(b"key sk-proj-abc123 basic c3Zj") == b"key *** basic "
    assert mask.feed(b"dXNlcjpw!") == b"***!"
    assert mask.feed(b"sk-") == b""
    assert mask.flush() == b"sk-"


def test_the_backend_secrets_are_its_key_and_the_urls_credentials_as_sent() -> None:
    """Every form the backend is sent (or may quote) a credential in: the key, the URL's
    password as written and decoded, and the basic-auth credential (base64, with and
    without its padding, JSON-escaped where it holds a slash)."""
    settings = Settings(upstream_url="http://svcuser:Sup3r%2FSecret@h/v1", api_key="sk-proj-abc123")
    basic = base64.b64encode(b"svcuser:Sup3r/Secret").decode()
    assert basic == basic_credential(settings.upstream_url or "")
    texts = settings.backend_secrets.texts
    assert {"sk-proj-abc123", "Sup3r%2FSecret", "Sup3r/Secret", basic} <= set(texts)
    assert "Sup3r\\/Secret" in texts  # as a JSON encoder that escapes "/" writes it
    assert basic.rstrip("=") in texts
    assert list(texts) == sorted(texts, key=len, reverse=True)  # a longer one replaced whole
    assert Settings(api_key="sk-proj-abc123").backend_secrets.replies == (b"sk-proj-abc123",)
    # placeholder keys are scrubbed from errors, never masked in answers
    assert Settings(api_key="EMPTY").backend_secrets == BackendSecrets(("EMPTY",), ())


@st.composite
def _spelled(draw: st.DrawFn, text: str) -> bytes:
    """``text`` as a JSON string may write it: each character as itself or as its ``\\u``
    escape, in either hex case, and a ``/`` also as ``\\/``."""
    forms = []
    for char in text:
        spellings = [char, f"\\u{ord(char):04x}", f"\\u{ord(char):04X}"]
        forms.append(draw(st.sampled_from([*spellings, "\\/"] if char == "/" else spellings)))
    return "".join(forms).encode()


# JSON string text with escapes of its own and starts of the key, and no "j": only the
# key's spelling between two of them holds the key whole
def _joined(pieces: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(pieces), max_size=8).map(b"".join)


_AROUND = _joined(
    [
        *(b"x", b" ", b"s", b"sk-pro", b"\\u0073k-", b"\\u0073\\u006B"),  # the key's starts
        *(b"\\n", b'\\"', b"\\\\", b"\\u00e9", b"\\u0078", b"\\/"),  # other escapes
    ]
)


@pytest.mark.parametrize("key", ["sk-proj-abc123", "sk-proj/abc123"])
@given(data=st.data(), cuts=st.lists(st.integers(0, 1000), max_size=12))
def test_a_key_in_json_escapes_is_masked_wherever_the_reads_split_it(
    key: str, data: st.DataObject, cuts: list[int]
) -> None:
    """A review: a backend that wrote the key with ``\\u`` escapes (some characters or
    all, hex in either case), or a ``/`` of it as ``\\/``, had it relayed unmasked, and a
    client decodes that JSON to the key. One secret and, with its ``\\/`` form, two."""
    before, after = data.draw(_AROUND), data.draw(_AROUND)
    body = before + data.draw(_spelled(key)) + after
    secrets = BackendSecrets.of(key)
    out = _streamed(secrets, body, cuts)
    assert out == before + b"***" + after  # all else as it came
    assert out == secrets.mask_body(body)
    assert secrets.mask_text(body.decode()) == out.decode()
    assert key not in json.loads(b'"' + out + b'"')  # what a client reads


def test_a_read_that_may_end_inside_an_escaped_key_is_held_back_only_then() -> None:
    mask = BackendSecrets.of(KEY.decode()).stream_mask()
    event = b'data: {"content":"caf\\u00e9\\n\\"sk-"}\n\n'
    assert mask.feed(event) == event  # escapes, none of them the key's: nothing held
    assert mask.feed(b"the key \\u00") == b"the key "  # could be the key's "s"
    assert mask.feed(b"73\\u006B-proj-abc\\u0031") == b""  # hex in either case: still could
    assert mask.feed(b"23!") == b"***!"
    assert mask.feed(b"\\u00") == b""
    assert mask.feed(b"e9 ok\\") == b"\\u00e9 ok"  # was not; a lone "\" still could be
    assert mask.flush() == b"\\"


def test_every_json_escape_of_a_key_is_masked_in_a_body_and_an_error() -> None:
    """The two-character escapes too, where a key holds such a character (``"``, ``\\``,
    ``/``), and a relayed error body, which is scrubbed as a text."""
    secrets = BackendSecrets.of('sk-"quoted"\\back/slash')
    body = (
        b'{"a":"sk-\\u0022quoted\\"\\u005C\\u0062ack\\/slash","b":"sk-\\"quoted\\"\\\\back/slash"}'
    )
    assert json.loads(body) == {"a": 'sk-"quoted"\\back/slash', "b": 'sk-"quoted"\\back/slash'}
    assert secrets.mask_body(body) == b'{"a":"***","b":"***"}'
    error = '{"error": {"message": "bad key sk-\\u0070roj-\\u0061\\u0062\\u0063123"}}'
    assert BackendSecrets.of(KEY.decode()).scrub(error) == '{"error": {"message": "bad key ***"}}'


# ---- escaped twice, and many secrets ------------------------------------------------------


@st.composite
def _spelled_twice(draw: st.DrawFn, text: str) -> bytes:
    """``text`` as a JSON string holding a JSON string may write it: each character as
    :func:`_spelled` does, or its escape escaped again (``\\\\u0073``, a ``/`` also as
    ``\\\\/`` or ``\\\\\\/``), as an encoder writes the JSON document it quotes."""
    forms = []
    for char in text:
        once = [f"\\u{ord(char):04x}", f"\\u{ord(char):04X}", *(["\\/"] if char == "/" else [])]
        twice = [f.replace("\\", "\\\\") for f in once]
        forms.append(draw(st.sampled_from([char, *once, *twice, *(["\\\\\\/"] * (char == "/"))])))
    return "".join(forms).encode()


# JSON string text with escapes (escaped backslashes among them, which a spelling after
# them must not take half of) and starts of the key's spellings, once and twice escaped
_AROUND_TWICE = _joined(
    [
        *(b"x", b"s", b"sk-pro", b"\\u0073k-", b"\\\\u0073k-", b"\\\\u0073\\\\u006B"),
        *(b"\\n", b'\\"', b"\\\\", b"\\\\\\\\", b'\\\\\\"', b"\\u00e9", b"\\\\/"),
    ]
)


@pytest.mark.parametrize("key", ["sk-proj-abc123", "sk-proj/abc123"])
@given(data=st.data(), cuts=st.lists(st.integers(0, 1000), max_size=12))
def test_a_key_escaped_twice_is_masked_whole_and_nothing_around_it(
    key: str, data: st.DataObject, cuts: list[int]
) -> None:
    """A review: a backend error whose message is the JSON a gateway got (a JSON string
    in a JSON string) writes an escaped key escaped again (``\\\\u0073\\\\u006b…``), which
    a client decoding both reads as the key: it went out unmasked. And a spelling found
    after an escaped backslash (``\\\\u0073k-…``: a backslash, then ``u0073k-…``) was
    masked from its second backslash on, leaving ``\\***``: invalid JSON, the
    backslash's escape eaten. Now a spelling is masked only where it starts a character
    of the string, and whole."""
    before, after = data.draw(_AROUND_TWICE), data.draw(_AROUND_TWICE)
    body = before + data.draw(_spelled_twice(key)) + after
    secrets = BackendSecrets.of(key)
    out = _streamed(secrets, body, cuts)
    assert out == secrets.mask_body(body)
    assert secrets.scrub(body.decode()) == out.decode()
    assert out == before + b"***" + after  # all else as it came
    assert key not in json.loads(b'"' + out + b'"')  # still JSON


def test_a_spelling_after_an_escaped_backslash_keeps_the_backslash() -> None:
    secrets = BackendSecrets.of(KEY.decode())
    # a backslash, then the key's first character escaped: the key at the second decoding
    body = b'{"m": "a \\\\u0073k-proj-abc123 b"}'
    assert secrets.mask_body(body) == b'{"m": "a *** b"}'
    # an escaped backslash, then the key: the backslash stays
    body = b'{"m": "a \\\\\\u0073k-proj-abc123 b"}'
    assert secrets.mask_body(body) == b'{"m": "a \\\\*** b"}'
    assert json.loads(secrets.mask_body(body)) == {"m": "a \\*** b"}
    # the last backslash of a read is held, so the next read starts at a character
    mask = secrets.stream_mask()
    assert mask.feed(b'{"m": "a \\\\') == b'{"m": "a '
    assert mask.feed(b"\\u0073k-proj-abc123 b") == b"\\\\*** b"


_SECRETS = st.lists(
    st.binary(min_size=1, max_size=5).map(lambda b: bytes(97 + x % 3 for x in b)),
    min_size=1,
    max_size=6,
    unique=True,
)


@given(secrets=_SECRETS, body=_ABC, cuts=st.lists(st.integers(0, 1000), max_size=12))
def test_up_to_six_secrets_split_anyhow_mask_like_the_whole_body(
    secrets: list[bytes], body: bytes, cuts: list[int]
) -> None:
    """The stream mask looks for all secrets with one pattern (their trie): what it gives
    is still what masking the whole body gives, however the reads split it, and it holds
    back only a tail that could start a secret."""
    whole = BackendSecrets(replies=tuple(secrets))
    mask = whole.stream_mask()
    out = [mask.feed(piece) for piece in _pieces(body, cuts)]
    rest = mask.flush()
    assert b"".join([*out, rest]) == whole.mask_body(body)
    if b"*" not in rest:  # what was held could start a secret, and only that was
        assert not rest or any(s.startswith(rest) and s != rest for s in secrets)


@given(
    secrets=_SECRETS,
    body=_ABC,
    piece=st.integers(1, 9),
    spelled=st.sampled_from([b"", b"\\u0061", b"\\\\", b"\\u0062\\u0063"]),
)
def test_a_large_reply_masked_in_pieces_is_what_masking_it_whole_gives(
    secrets: list[bytes], body: bytes, piece: int, spelled: bytes
) -> None:
    """A reply body over MASKED_AT_ONCE_BYTES is masked in pieces, other tasks run between
    them (``exchange.masked_in_pieces``): the same bytes as masking it whole, and the body
    itself (not a copy) when nothing in it was masked. Secrets of up to 5 letters of 3
    make matches across the pieces' ends frequent, and escapes send pieces the spellings'
    way; ``MASKED_AT_ONCE_BYTES`` made a few bytes, so that a short body has pieces."""
    whole = BackendSecrets(replies=tuple(secrets))
    body = spelled + body + spelled

    async def in_pieces() -> bytes:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(exchange, "MASKED_AT_ONCE_BYTES", piece)
            return await exchange.masked_in_pieces(body, whole)

    out = trio.run(in_pieces)
    assert out == whole.mask_body(body)
    assert (out is body) is (out == body)


def test_a_large_reply_with_nothing_to_mask_is_not_copied_while_masked_in_pieces() -> None:
    """The usual large answer quotes no secret: masking it in pieces keeps none of them
    (the body holds those bytes), so it costs no second copy of the body (a 40 MB answer
    held 40 MB more until its last piece was searched); one that has something masked
    is copied from there on only."""
    import tracemalloc

    secrets = BackendSecrets(replies=(b"sk-secret-key-0123456789",))
    body = b'{"text": "' + b"plain words " * 400_000 + b'"}'  # ~4.8 MB

    async def in_pieces(body: bytes) -> tuple[bytes, int]:
        tracemalloc.start()
        try:
            out = await exchange.masked_in_pieces(body, secrets)
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    out, peak = trio.run(in_pieces, body)
    assert out is body
    assert peak < 4 * exchange.MASKED_AT_ONCE_BYTES, peak  # a piece or two at a time
    quoting = body[:-2] + b' sk-secret-key-0123456789"}'  # masked at its very end
    out, _ = trio.run(in_pieces, quoting)
    assert out == secrets.mask_body(quoting) and out.endswith(b' ***"}')
