"""Ollama API <-> OpenAI API translation, sans-I/O.

Everything here is a pure function or a small state machine fed parsed JSON: no sockets, no
trio, no clock reads except the optional default in :func:`utc_timestamp`. The routes call
``validate_*`` on the client body, ``*_to_openai`` to build the backend request, and the
response-side functions (or :class:`OllamaStreamTranslator` for streams) to build what the
client receives.

Rules follow the translation checklist in the API reference notes: send only the sampling
fields the client set, never emit ``null`` content, integer-nanosecond durations, tool-call
arguments as objects for Ollama clients and JSON strings for OpenAI backends.

The package, in the order a request meets it (each module imports only those above it):

* :mod:`.validation` — the client's body checked (a mistake is a 400, never a 500);
* :mod:`.request` — the Ollama request as the backend's chat or completions request;
* :mod:`.answer` — a whole backend answer as Ollama's;
* :mod:`.chunks` — a backend stream's events read (the content-only chunk without decoding);
* :mod:`.streams` — the stream state fed one event at a time: observers for the metrics and
  the stream's outcome, translators that build Ollama's lines;
* :mod:`.responses` — a whole Responses API answer as the events of its stream;
* :mod:`.embeddings` and :mod:`.models` — embeddings answers and model lists.
"""

from __future__ import annotations

from trioproxy.jsonutil import JSONDict

from .answer import (
    FINISHED_WITH_ERROR,
    Timings,
    _first_choice,
    _message_tool_calls,
    _refusal,
    _text,
    _thinking,
    _usage_counts,
    completion_logprobs,
    openai_chat_to_ollama_chat,
    openai_chat_to_ollama_generate,
    openai_completion_to_ollama_generate,
    parse_tool_arguments,
    utc_timestamp,
)
from .chunks import (
    _ContentChunks,
    _decode_str,
    parse_chunk,
    read_chunk,
)
from .embeddings import (
    cut_to_dimensions,
    embed_batches,
    embedding_count,
    joined_embeddings,
    openai_embeddings_to_ollama_embed,
    openai_embeddings_to_ollama_embeddings,
)
from .models import (
    is_embedding_model,
    listed_capabilities,
    model_family,
    ollama_ps,
    ollama_ps_joined,
    ollama_ps_parts,
    ollama_ps_template,
    ollama_pull_progress,
    ollama_show,
    openai_model_entry,
    openai_model_list,
    openai_models_to_ollama_tags,
)
from .request import (
    _generated_call_id,
    _response_format,
    has_system_messages_to_join,
    image_data_url,
    keep_alive_unloads,
    nine_character_id,
    ollama_chat_to_openai,
    ollama_embed_to_openai,
    ollama_embeddings_input,
    ollama_embeddings_to_openai,
    ollama_generate_to_completions,
    ollama_generate_to_openai,
    openai_passthrough_request,
    think_extra_body,
    with_extra_body,
    with_nine_character_ids,
    with_one_system_message,
)
from .responses import is_response, response_as_events, response_events
from .streams import (
    MAX_HELD_TOOL_CALL_BYTES,
    OllamaCompletionStreamTranslator,
    OllamaStreamTranslator,
    OpenAIStreamObserver,
    ReplayedResponsesObserver,
    ResponsesStreamObserver,
    StreamTooLarge,
    UntranslatableStream,
    _HeldToolCalls,
    _PendingToolCall,
)
from .validation import (
    MAX_TOP_LOGPROBS,
    RequestValidationError,
    _check_str_list,
    _is_finite_number,
    validate_ollama_chat,
    validate_ollama_embed,
    validate_ollama_embeddings,
    validate_ollama_generate,
    validate_openai_body,
)

__all__ = [
    "FINISHED_WITH_ERROR",
    "MAX_HELD_TOOL_CALL_BYTES",
    "MAX_TOP_LOGPROBS",
    "JSONDict",
    "OllamaCompletionStreamTranslator",
    "OllamaStreamTranslator",
    "OpenAIStreamObserver",
    "ReplayedResponsesObserver",
    "RequestValidationError",
    "ResponsesStreamObserver",
    "StreamTooLarge",
    "Timings",
    "UntranslatableStream",
    "_ContentChunks",
    "_HeldToolCalls",
    "_PendingToolCall",
    "_check_str_list",
    "_decode_str",
    "_first_choice",
    "_generated_call_id",
    "_is_finite_number",
    "_message_tool_calls",
    "_refusal",
    "_response_format",
    "_text",
    "_thinking",
    "_usage_counts",
    "completion_logprobs",
    "cut_to_dimensions",
    "embed_batches",
    "embedding_count",
    "has_system_messages_to_join",
    "image_data_url",
    "is_embedding_model",
    "is_response",
    "joined_embeddings",
    "keep_alive_unloads",
    "listed_capabilities",
    "model_family",
    "nine_character_id",
    "ollama_chat_to_openai",
    "ollama_embed_to_openai",
    "ollama_embeddings_input",
    "ollama_embeddings_to_openai",
    "ollama_generate_to_completions",
    "ollama_generate_to_openai",
    "ollama_ps",
    "ollama_ps_joined",
    "ollama_ps_parts",
    "ollama_ps_template",
    "ollama_pull_progress",
    "ollama_show",
    "openai_chat_to_ollama_chat",
    "openai_chat_to_ollama_generate",
    "openai_completion_to_ollama_generate",
    "openai_embeddings_to_ollama_embed",
    "openai_embeddings_to_ollama_embeddings",
    "openai_model_entry",
    "openai_model_list",
    "openai_models_to_ollama_tags",
    "openai_passthrough_request",
    "parse_chunk",
    "parse_tool_arguments",
    "read_chunk",
    "response_as_events",
    "response_events",
    "think_extra_body",
    "utc_timestamp",
    "validate_ollama_chat",
    "validate_ollama_embed",
    "validate_ollama_embeddings",
    "validate_ollama_generate",
    "validate_openai_body",
    "with_extra_body",
    "with_nine_character_ids",
    "with_one_system_message",
]
