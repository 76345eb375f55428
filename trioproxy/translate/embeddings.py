"""Embeddings: Ollama's embedding requests' answers from the backend's, batches joined."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

from trioproxy.jsonutil import JSONDict

from .answer import Timings, _usage_counts


def _vector(embedding: object) -> list[float]:
    if isinstance(embedding, list):
        return embedding
    if isinstance(embedding, str):
        # A backend that ignored encoding_format=float: base64 of little-endian float32.
        raw = base64.b64decode(embedding)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw[: len(raw) - len(raw) % 4]))
    return []


def _embedding_items(resp: JSONDict) -> list[JSONDict]:
    """The ``data`` items of an ``/embeddings`` answer, in input order."""
    data = resp.get("data")
    if not isinstance(data, list):
        return []
    items = [d for d in data if isinstance(d, dict)]
    items.sort(key=lambda d: i if isinstance(i := d.get("index"), int) else 0)
    return items


def _vectors(resp: JSONDict) -> list[list[float]]:
    return [_vector(d.get("embedding")) for d in _embedding_items(resp)]


# OpenAI's caps on one /embeddings request: 2,048 inputs, and 300,000 tokens summed over
# them (a RAG ingest of 2,048 chunks of 1,000 characters is about 500,000); Ollama's
# /api/embed has neither
EMBED_BATCH_INPUTS = 2048
EMBED_BATCH_TOKENS = 300_000


def embed_batches(
    payload: JSONDict, size: int = EMBED_BATCH_INPUTS, tokens: int = EMBED_BATCH_TOKENS
) -> list[JSONDict]:
    """An ``/embeddings`` payload (list ``input``) as requests of at most ``size`` inputs
    and at most ``tokens`` tokens each, in order (an input larger than ``tokens`` alone
    in its request: the backend judges it).

    Without the backend's tokenizer, a text's tokens are bounded by its UTF-8 bytes (a
    token of OpenAI's byte-level BPE, as of any tokenizer with byte fallback, is at least
    one byte), plus one: so a batch is never refused for its size, at the price of more
    batches than needed (about four times as many for English text)."""
    inputs = payload["input"]
    batches: list[list[Any]] = [[]]
    held = 0
    for item in inputs:
        bound = _token_bound(item)
        if batches[-1] and (len(batches[-1]) == size or held + bound > tokens):
            batches.append([])
            held = 0
        batches[-1].append(item)
        held += bound
    if len(batches) == 1:
        return [payload]
    return [{**payload, "input": batch} for batch in batches]


def _token_bound(item: Any) -> int:
    """At least the tokens of one embedding input: a text or a list of token ids."""
    if isinstance(item, str):
        return (len(item) if item.isascii() else len(item.encode(errors="replace"))) + 1
    return len(item) + 1 if isinstance(item, list) else 1


def embedding_count(resp: JSONDict) -> int:
    return len(_embedding_items(resp))


def joined_embeddings(answers: list[JSONDict]) -> JSONDict:
    """The answers to :func:`embed_batches`' requests as one ``/embeddings`` answer: every
    vector in input order, renumbered, and the usage summed."""
    if len(answers) == 1:
        return answers[0]
    data = [
        {**item, "index": index}
        for index, item in enumerate(item for resp in answers for item in _embedding_items(resp))
    ]
    prompt = sum(_usage_counts(resp)[0] for resp in answers)
    usage = {"prompt_tokens": prompt, "total_tokens": prompt}
    return {**answers[0], "data": data, "usage": usage}


def openai_embeddings_to_ollama_embed(
    resp: JSONDict, model: str, timings: Timings, dimensions: int = 0
) -> JSONDict:
    """``/embeddings`` response as ``/api/embed``: every vector, in input order, and no
    longer than ``dimensions`` (when positive) as Ollama cuts them."""
    prompt_tokens, _ = _usage_counts(resp)
    vectors = _vectors(resp)
    if dimensions > 0:
        vectors = [cut_to_dimensions(vector, dimensions) for vector in vectors]
    return {
        "model": model,
        "embeddings": vectors,
        "total_duration": int(timings.total_ns),
        "load_duration": 0,
        "prompt_eval_count": prompt_tokens,
    }


def cut_to_dimensions(vector: list[float], dimensions: int) -> list[float]:
    """Ollama's ``dimensions``: a vector longer than that keeps its first ``dimensions``
    values, scaled back to unit length (as Ollama's normalize, whose floor on the norm
    keeps a zero vector zero); a backend that honoured the field answered no longer one,
    and one that ignores it (llama.cpp's server) or refused it answered its full length."""
    if len(vector) <= dimensions:
        return vector
    kept = vector[:dimensions]
    try:
        scale = 1.0 / max(math.sqrt(math.fsum(value * value for value in kept)), 1e-12)
    except (TypeError, OverflowError):  # not numbers, or too large to square: as they came
        return kept
    return [value * scale for value in kept]


def openai_embeddings_to_ollama_embeddings(resp: JSONDict) -> JSONDict:
    """``/embeddings`` response as legacy ``/api/embeddings``: ``{"embedding": [...]}``.

    The legacy API embeds one prompt. When the request carried a list ``input`` (accepted by
    :func:`validate_ollama_embeddings`) the other vectors are not dropped silently: they are all
    returned under ``"embeddings"`` as well, which legacy clients ignore.
    """
    vectors = _vectors(resp)
    out: JSONDict = {"embedding": vectors[0] if vectors else []}
    if len(vectors) > 1:
        out["embeddings"] = vectors
    return out
