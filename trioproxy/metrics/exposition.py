"""Exposition: families encoded for a scraper, in its format, gzipped when it accepts it.

prometheus_client's own encoders write the bytes (no hand-written exposition):
:func:`exposition_format` picks text 0.0.4 or OpenMetrics from the ``Accept`` header (and
a cheaper encoder for OpenMetrics when no name needs escaping); :func:`encode_head`
encodes the kept part of an exposition in small parts, so a worker thread doing it never
holds the GIL for long; :class:`GzipHead` compresses that part once and lets each scrape
append its own tail. Nothing here knows the proxy's series: it encodes whatever families
it is given, on the event loop or in a thread.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric


class _Families:
    """A collector over a fixed list of families (what the encoders call)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


_OPENMETRICS_EOF = b"# EOF\n"


def exposition_format(accept: str | None) -> tuple[Callable[[Sequence[Metric]], bytes], str]:
    """The encoder of a list of families for a scraper's ``Accept`` header (text 0.0.4
    unless it asks for OpenMetrics), and its Content-Type. The encoder reads only the
    families it is given: it may run in another thread."""
    try:
        encoder, content_type = choose_encoder(accept or "")
    except (TypeError, ValueError):
        # prometheus_client compares a quoted version ('version="1.0.0"') as a string
        # with a number: the text format every scraper reads, not a 500
        encoder, content_type = choose_encoder("")
    canonical = _canonical_openmetrics(content_type)
    if canonical is not None:
        encoder, content_type = choose_encoder(canonical)
    unescaped = _unescaped_encoder(content_type)

    def encode(families: Sequence[Metric]) -> bytes:
        listed = list(families)
        if unescaped is not None and _plain_names(listed):
            return unescaped(_Families(listed))
        return encoder(_Families(listed))

    return encode, content_type


def _unescaped_encoder(content_type: str) -> Callable[[Any], bytes] | None:
    """For OpenMetrics with ``escaping=underscores`` (what Prometheus 2.x gets: it names no
    escaping), the same version's encoder with ``escaping=allow-utf-8``, which writes the
    same bytes for names that need no escaping (:func:`_plain_names`), else None.

    Why: prometheus_client's OpenMetrics encoder escapes every sample's name character by
    character under ``underscores`` (a call per character), even a name with nothing to
    escape; the text format's checks the name with one regular expression. That made
    OpenMetrics cost 1.8x the text format per sample (9.5 vs 5.3 us, docs/metrics.md)."""
    if not content_type.startswith("application/openmetrics-text"):
        return None
    params = dict(
        part.strip().partition("=")[::2] for part in content_type.split(";")[1:] if "=" in part
    )
    if params.get("escaping") != "underscores" or not params.get("version"):
        return None
    version = params["version"]
    return choose_encoder(f"application/openmetrics-text; version={version}; escaping=allow-utf-8")[
        0
    ]


_PLAIN_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
"""A name that OpenMetrics' ``underscores`` escaping leaves as it is (prometheus_client's
``_is_legacy_labelname_rune`` for every character: no ``:``, no digit first), and that
``allow-utf-8`` neither quotes nor escapes: both write it as it is."""


@functools.lru_cache(maxsize=1024)  # the exposition's few dozen names, checked once
def _plain_name(name: str) -> bool:
    return _PLAIN_NAME.fullmatch(name) is not None


def _plain_names(families: Sequence[Metric]) -> bool:
    """Whether every family, sample and label name in ``families`` is plain
    (:data:`_PLAIN_NAME`): then both escapings encode them to the same bytes (label
    values are escaped alike by both; exemplars do not depend on it)."""
    for family in families:
        samples = family.samples
        names = {sample.name for sample in samples}
        names.add(family.name)
        names.update(*[sample.labels for sample in samples])
        if not all(map(_plain_name, names)):
            return False
    return True


_OPENMETRICS_VERSIONS = ("1.0.0", "2.0.0")


def _canonical_openmetrics(content_type: str) -> str | None:
    """The ``Accept`` of the OpenMetrics version prometheus_client writes that
    ``content_type`` means, when it names another (None when it is one already, or no
    OpenMetrics): prometheus_client echoes whatever version >= 1.0.0 a scraper asks for,
    and reads of one format share their rendering and kept body by Content-Type, so any
    spelling (``1.0.1``, ``1.0.10``...) would cost an encoding and a body of its own."""
    if not content_type.startswith("application/openmetrics-text"):
        return None
    params = dict(
        part.strip().partition("=")[::2] for part in content_type.split(";")[1:] if "=" in part
    )
    version = params.get("version", "")
    if version in _OPENMETRICS_VERSIONS:
        return None
    major = version.partition(".")[0]
    chosen = _OPENMETRICS_VERSIONS[1] if major.isdigit() and int(major) >= 2 else "1.0.0"
    escaping = params.get("escaping", "underscores")
    return f"application/openmetrics-text; version={chosen}; escaping={escaping}"


LOOP_ENCODED_SAMPLES = 300
"""Families of up to this many samples are encoded on the event loop, about 2 ms of CPU:
built, encoded and gzipped they cost 5.4-5.6 us per sample in the text format and
6.2-6.4 us in OpenMetrics (thread_time medians of 60, 190 to 2,848 samples, load average
0.6-2 on 2 cores; the bench's exposition holds about 140), and the rest of a scrape
(copy, derived families) about 0.6 ms more. Until 2026-12-02 this was 4,000, taken to be
5 ms at 1.3 us per sample: such a scrape held the loop for about 25 ms. Smaller ones stay
on the loop because the hand-offs to a worker thread and back, each waiting for the GIL the
busy loop holds (up to the interpreter's 5 ms switch interval), made a scrape of a few
hundred samples under load take 28 ms instead of 3. Larger ones go to the thread, so that
a scrape of a full label budget (50 models on 7 endpoints: 17,903 samples here, 116-122
ms) never holds the loop."""

SAMPLES_PER_PART = 200
"""Largest run of samples encoded at once by :func:`encode_head`, so in a thread the event
loop waits for the GIL at most about one part: 200 samples of a histogram family encode in
0.7 ms (1,000 took 3.4 ms on a quiet machine, 6 ms on a busy one: past the 5 ms switch
interval), and the whole costs the same in parts of 200 as of 1,000 (21.4-21.6 ms for
6,300 samples, process time, best of 7)."""


def encode_head(
    encode: Callable[[Sequence[Metric]], bytes],
    content_type: str,
    families: Iterable[Metric],
    between_parts: Callable[[], object] | None = None,
) -> bytes:
    """``families`` encoded as the start of an exposition that more families follow:
    without OpenMetrics' closing ``# EOF`` (the text format has no closing line).

    Encoded in parts of at most :data:`SAMPLES_PER_PART` samples, calling
    ``between_parts`` after each: in a worker thread, ``time.sleep(0)`` hands the GIL
    to the event loop there, instead of making it wait for the interpreter's switch
    interval (5 ms) after each of its system calls. Each line of an exposition stands
    alone, so the parts (a family's HELP and TYPE with its first) make the whole
    exposition, byte for byte."""
    openmetrics = content_type.startswith("application/openmetrics-text")
    out: list[bytes] = []
    for family in families:
        samples = family.samples
        for start in range(0, len(samples) or 1, SAMPLES_PER_PART):
            part = Metric(family.name, family.documentation, family.type, family.unit)
            part.samples = samples[start : start + SAMPLES_PER_PART]
            body = encode([part])
            if openmetrics:
                body = _without_eof(body)
            if start:
                body = _without_header(body)
            out.append(body)
            if between_parts is not None:
                between_parts()
    return b"".join(out)


def encode_apart(
    encode: Callable[[Sequence[Metric]], bytes], content_type: str, family: Metric
) -> tuple[bytes, bytes]:
    """``family`` encoded as part of an exposition (:func:`encode_head`), its comment
    lines (HELP, TYPE, UNIT) and its sample lines apart."""
    body = encode([family])
    if content_type.startswith("application/openmetrics-text"):
        body = _without_eof(body)
    samples = _without_header(body)
    return body[: len(body) - len(samples)], samples


def _without_eof(body: bytes) -> bytes:
    if not body.endswith(_OPENMETRICS_EOF):
        raise ValueError("an OpenMetrics exposition without its # EOF")
    return body[: -len(_OPENMETRICS_EOF)]


class TailEncodings:
    """The families of an exposition's tail (the few dozen derived for each scrape, and
    the sampled ones) as encoded at the last scrape, by format: a scrape encodes only
    those whose samples changed since (under load, about one in five: request counts, a
    percentile, the host's counters, uptime), and reuses the others' bytes. The same
    bytes as encoding the whole tail at once: each family's lines stand alone, and a
    family's encoding depends only on it (see :func:`encode_head`). Kept: one encoding per
    format and family name. Used on the event loop only."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[tuple[Any, ...], bytes]] = {}

    def encode(
        self,
        encode: Callable[[Sequence[Metric]], bytes],
        content_type: str,
        families: Iterable[Metric],
    ) -> bytes:
        """``families`` encoded as ``encode`` encodes them, as a whole exposition."""
        openmetrics = content_type.startswith("application/openmetrics-text")
        last = self._last
        out: list[bytes] = []
        for family in families:
            content = _content(family)
            slot = (content_type, family.name)
            kept = last.get(slot)
            if kept is not None and content is not None and kept[0] == content:
                out.append(kept[1])
                continue
            body = encode([family])
            if openmetrics:
                body = _without_eof(body)
            if content is not None:
                last[slot] = (content, body)
            out.append(body)
        if openmetrics:
            out.append(_OPENMETRICS_EOF)
        return b"".join(out)


def _content(family: Metric) -> tuple[Any, ...] | None:
    """What ``family``'s encoding depends on, to compare with == (a value by its repr:
    0.0 == -0.0, and 1 == 1.0, are written apart); None for samples with an exemplar or a
    native histogram, which are encoded every time."""
    samples = []
    for s in family.samples:
        if s.exemplar is not None or s.native_histogram is not None:
            return None
        samples.append((s.name, tuple(s.labels.items()), repr(s.value), s.timestamp))
    return family.documentation, family.type, family.unit, tuple(samples)


def _without_header(body: bytes) -> bytes:
    """A family's samples without the comment lines before them (HELP, TYPE, UNIT: one
    line each, newlines in them escaped); sample lines never start with ``#``."""
    at = 0
    while body.startswith(b"#", at):
        at = body.index(b"\n", at) + 1
    return body[at:]


GZIP_LEVEL = 1
"""zlib's fastest level: a busy proxy's 540 KB exposition compresses to 31 KB (17x) in
1 ms of CPU; level 6 (Go's default, node_exporter's) saves 6 KB more for 3 ms, and level 9
(prometheus_client's own ``gzip.compress``) 8 KB more for 6 ms (docs/metrics.md)."""

LOOP_COMPRESSED_BYTES = 512 * 1024
"""A kept encoding of up to this many bytes (about 1 ms at :data:`GZIP_LEVEL`; those that
:data:`LOOP_ENCODED_SAMPLES` makes are about 40 KB) is compressed on the event loop; a larger
one in a worker thread (zlib lets go of the GIL while it compresses)."""

_GZIP_WBITS = zlib.MAX_WBITS | 16  # a gzip header and trailer around the deflate stream


class GzipHead:
    """The start of a gzip body, compressed once and continued by each scrape.

    An exposition is its primary families' encoding (kept until a series changes, see
    :class:`Snapshot`) and a tail encoded anew for each scrape (the derived and sampled
    families). The head is compressed once and flushed to a byte boundary
    (``Z_SYNC_FLUSH``: every byte of it is in :attr:`data`); :meth:`finish` continues a
    copy of the compressor's state after it with the tail and closes the stream. The
    copy keeps the head as the window the tail's matches refer to, and the gzip trailer
    the CRC and length of both, so the result is one gzip member whose content is
    ``head + tail``, byte for byte, as small as compressing it whole. A scrape costs a
    copy of the state (kept: about 290 KB, never changed once made) and the tail's
    compression, about 60 us.

    Made with ``ready=False`` (a head small enough to compress on the event loop), the
    head is compressed at its first :meth:`finish` together with that tail, in one go:
    under load every scrape finds the series changed and its head new, used once, and
    the copy of the state and the flush cost nearly as much as compressing it (25 KB:
    4 of 7 parts). Only a second use compresses the head for itself."""

    __slots__ = ("_head", "_state", "_used", "data")

    def __init__(self, head: bytes, *, ready: bool = True) -> None:
        self._head = head
        self._state: Any = None
        self._used = False
        self.data = b""
        if ready:
            self._prepare()

    def _prepare(self) -> None:
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
        self.data = compressor.compress(self._head) + compressor.flush(zlib.Z_SYNC_FLUSH)
        self._state = compressor

    def finish(self, tail: bytes) -> bytes:
        """The whole gzip body of ``head + tail``."""
        if self._state is None:
            if not self._used:
                self._used = True
                compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
                return b"".join((compressor.compress(self._head), compressor.compress(tail),
                                 compressor.flush()))  # fmt: skip
            self._prepare()
        compressor = self._state.copy()
        return b"".join((self.data, compressor.compress(tail), compressor.flush()))
