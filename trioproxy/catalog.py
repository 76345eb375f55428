"""The backend's model list, fetched on demand and cached briefly.

Clients such as Open WebUI poll ``/api/tags`` and ``/api/ps`` every few seconds; a short
cache keeps those polls from turning into a backend request each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from .errors import BackendSecrets, ProxyError, UpstreamStatusError
from .exchange import Call
from .forward import call_raw, checked_answer, note_model, read_answer
from .json_threads import by_size
from .jsonutil import compact_json
from .model_mapping import ModelMapper, ollama_key, with_default_tag
from .translate import listed_capabilities, ollama_ps_parts

CACHE_SECONDS = 5.0
NO_LIST_RETRY_SECONDS = 60.0
FAILED_LIST_RETRY_SECONDS = 10.0
LIST_WAIT_SECONDS = 2.0
"""How long a request for ``NAME:latest`` waits for the backend's list, to learn whether
the backend spells the model with its tag (vLLM's ``--served-model-name x:latest``)."""
TAKEN_LIST_BYTES = 4 * 1024 * 1024
"""The largest model list the readiness check hands on (OpenRouter's, some 400 models with
their descriptions, is about 1 MB): a larger one is fetched when a route needs it."""
FAILURE_CACHE_SECONDS = 1.0
"""How long a failed fetch answers for the next ones. Requests that queued behind it
get its error at once instead of each trying again, with retries, one after another."""


# what a backend without a /models route answers there
_NO_MODEL_LIST = (404, 405, 501)


# what a route answers from the list and the mapping (/api/tags, /v1/models, /api/ps)
ListAnswer = Callable[[list[dict[str, Any]], ModelMapper], Any]


@dataclass(frozen=True, slots=True)
class ModelList:
    """A backend's ``GET /models`` answer as the catalog keeps it (:func:`model_list`)."""

    models: list[dict[str, Any]]  # its entries (objects with an id)
    ids: frozenset[str]
    by_key: dict[str, str]  # its ids by ollama_key (one id per key only)
    # Ollama's capabilities the answer gave beside its data (llama.cpp's), by backend id
    capabilities: dict[str, tuple[str, ...]]
    content: bytes = b""  # the body it was read from, before masking


_NO_MODELS = ModelList([], frozenset(), {}, {})


def model_list(content: bytes, secrets: BackendSecrets) -> ModelList | None:
    """A 2xx body of ``GET /models`` read for the catalog, the backend's secrets masked
    first (a backend that echoes our key, in an owned_by say, must not list it); None if
    its ``data`` is no list (``{"data": 5}``); BadUpstreamResponse if it is no JSON or
    reports an error (:func:`checked_answer`). Pure: on the loop, or in a JSON thread for
    a list of OpenRouter's size (1-2 MB: masked, decoded and read in 6-8 ms)."""
    payload = checked_answer(secrets.mask_body(content), secrets)
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return None
    models = [m for m in data if isinstance(m, dict) and "id" in m]
    ids = frozenset(m["id"] for m in models if isinstance(m["id"], str))
    return ModelList(models, ids, _by_key(ids), listed_capabilities(payload), content)


class ModelCatalog:
    def __init__(self) -> None:
        self._list: ModelList | None = None  # the last one fetched
        # what list_answer wrote from it, by what it built
        self._answers: dict[ListAnswer, bytes] = {}
        # /api/ps's template and its parts (split)
        self._split: tuple[bytes, list[bytes]] | None = None
        self._no_ids_until = -1e9  # trio clock: a fetch for lists() failed; not asked again
        self._fetched_at = -1e9
        self._asked_at = -1e9  # trio clock: when the list held was asked for
        self._failure: ProxyError | None = None
        self._failed_at = -1e9
        self._lock = trio.Lock()

    async def models(self, call: Call) -> list[dict[str, Any]]:
        if trio.current_time() - self._fetched_at < CACHE_SECONDS:
            return self._models
        async with self._lock:
            now = trio.current_time()
            if now - self._fetched_at < CACHE_SECONDS:
                return self._models
            if self._failure is not None and now - self._failed_at < FAILURE_CACHE_SECONDS:
                raise self._failure.with_traceback(None)
            await self._fetch(call)
        return self._models

    @property
    def _models(self) -> list[dict[str, Any]]:
        return self._list.models if self._list is not None else []

    @property
    def list_bytes(self) -> int:
        """The size of the body the list held came in (0 without one)."""
        return len(self._list.content) if self._list is not None else 0

    async def _fetch(self, call: Call) -> None:
        """``GET /models`` into the catalog (the lock held)."""
        asked_at = trio.current_time()
        secrets = call.app.settings.backend_secrets
        try:
            result = await call_raw(call, "/models", None, method="GET")
            content = result.response.content
            listed = self._held_if_same(content) or await read_answer(
                call, model_list, content, secrets
            )
        except ProxyError as failure:
            self._failure, self._failed_at = failure, trio.current_time()
            raise
        self._keep(listed or _NO_MODELS, asked_at)  # {"data": 5}: an empty list, no crash

    def _held_if_same(self, content: bytes) -> ModelList | None:
        """The list held if ``content`` is the body it came in: lists change rarely, and
        polls fetch one every CACHE_SECONDS; comparing 2 MB equal bytes takes 0.1 ms of the
        loop, decoding them 6 ms of a thread, most of it one call into orjson that holds
        the loop as long (json_threads)."""
        held = self._list
        return held if held is not None and held.content and content == held.content else None

    async def take(self, content: bytes, secrets: BackendSecrets, asked_at: float) -> None:
        """A 2xx body of ``GET /models`` that the readiness check asked for at ``asked_at``
        (trio's clock; at a worker's start, then while no request shows the backend up):
        kept as the list, so Ollama's name rules hold from the first request, in every
        worker, unless a list asked for later is held already (a slow check must not put
        an older list back). Anything but a list is left aside, as is one past
        TAKEN_LIST_BYTES (read in a JSON thread, which a probe waiting for the check would
        wait for): the check asks whether the backend answers, not what it lists."""
        if asked_at < self._asked_at or len(content) > TAKEN_LIST_BYTES:
            return  # (checked before decoding it, too)
        listed = self._held_if_same(content)
        if listed is None:
            read = partial(model_list, content, secrets)
            try:  # bytes in, a new object out: abandoned to a check that gives up
                listed = await by_size(len(content), read, abandon_on_cancel=True)
            except ProxyError:
                return
        if listed is not None:
            self._keep(listed, asked_at)

    def _keep(self, listed: ModelList, asked_at: float) -> None:
        """``listed`` as the list, unless the one held was asked for later (a request's
        slow fetch must not put back a list older than the readiness check's, nor the other
        way round); either way the list held is as fresh as this one."""
        self._fetched_at = trio.current_time()
        self._failure = None
        if asked_at < self._asked_at:
            return
        self._asked_at = asked_at
        if listed is not self._list:
            self._answers = {}
        self._list = listed

    def written(self, build: ListAnswer, models: list[dict[str, Any]]) -> bytes | None:
        """What :func:`list_answer` wrote with ``build`` from ``models``, if they are the
        list held and it wrote it since the list came."""
        held = self._list
        return self._answers.get(build) if held is not None and models is held.models else None

    def split(self, template: bytes) -> list[bytes]:
        """``ollama_ps_parts(template)``, kept for the template written last (one: the
        list held's), so that ``/api/ps`` only joins them with each request's expiry (760
        models: 6 µs on the loop, where building and encoding them cost 2.4 ms a poll)."""
        if self._split is None or self._split[0] is not template:
            self._split = (template, ollama_ps_parts(template))
        return self._split[1]

    def keep_written(self, build: ListAnswer, models: list[dict[str, Any]], body: bytes) -> None:
        """``body``, written with ``build`` from ``models``, for :meth:`written`, if they
        are (still) the list held."""
        held = self._list
        if held is not None and models is held.models:
            self._answers[build] = body

    async def _fetch_for_a_request(self, call: Call) -> None:
        """The list for :meth:`lists`, unless it came, or was given up on, while this
        request waited for the lock (each waiter fetched again after the one before it
        gave up on a hanging /models)."""
        async with self._lock:
            now = trio.current_time()
            if self._list is not None or now < self._no_ids_until:
                return
            if self._failure is not None and now - self._failed_at < FAILURE_CACHE_SECONDS:
                raise self._failure.with_traceback(None)
            await self._fetch(call)

    async def listed(self, call: Call) -> list[dict[str, Any]]:
        """:meth:`models` for listing them to a client; empty for a backend that does not
        implement ``/models`` (404/405/501), so clients that poll the list (Open WebUI,
        ``ollama.list()``) still get a list, as from an Ollama with no models pulled."""
        try:
            return await self.models(call)
        except UpstreamStatusError as exc:
            if exc.status in _NO_MODEL_LIST:
                return []
            raise

    async def lists(self, call: Call, backend_name: str) -> bool:
        """Whether the backend lists a model by exactly this name, in the last list fetched
        (any fetch refreshes it: Open WebUI polls the list; a request fetches one only if
        there is none, since lists change rarely and a request must not wait for one every
        few seconds); False if the backend cannot say. A backend without a list, or one
        that answers it has none (404/405/501), is not asked again for a minute on a
        request's path, after other failures (or a list slower than LIST_WAIT_SECONDS)
        for 10 s: a failing list must not cost each such request a backend round trip."""
        if self._list is None and trio.current_time() >= self._no_ids_until:
            try:
                # a request waits a moment for a list, not for a backend that never sends
                # one: without it the tag is dropped, as for most backends it must be
                with trio.fail_after(LIST_WAIT_SECONDS):
                    await self._fetch_for_a_request(call)
            except (ProxyError, trio.TooSlowError) as exc:
                no_list = isinstance(exc, UpstreamStatusError) and exc.status in _NO_MODEL_LIST
                # no list to have: not asked for a while; a passing failure: a bit later
                wait = NO_LIST_RETRY_SECONDS if no_list else FAILED_LIST_RETRY_SECONDS
                self._no_ids_until = trio.current_time() + wait
                return False
        return self.lists_now(backend_name)

    def spelling(self, backend_name: str) -> str:
        """The backend's own spelling of a name (Ollama's rules: case, its default
        registry and namespace, and the tag aside) by the list last fetched, when that
        lists exactly one such id and not the name as spelled; else the name itself (the
        backend decides). Never fetches: a request must not wait for a list (a slow
        ``/models`` held every first request), and clients that spell names loosely
        (Open WebUI, n8n) fetch it through ``/api/tags`` anyway."""
        held = self._list
        if held is None or backend_name in held.ids:  # nearly every request: one set lookup
            return backend_name
        tagged = with_default_tag(backend_name)  # vLLM's --served-model-name x:latest
        if tagged in held.ids:
            return tagged
        return held.by_key.get(ollama_key(backend_name), backend_name)

    def lists_now(self, backend_name: str) -> bool:
        """Whether the list last fetched holds exactly this name."""
        held = self._list
        return held is not None and backend_name in held.ids

    def capabilities(self, backend_id: str) -> tuple[str, ...]:
        """Ollama's capabilities the list last fetched gave for an id beside its entry
        (llama.cpp's server's ``models``); empty if it gave none."""
        return self._list.capabilities.get(backend_id, ()) if self._list is not None else ()

    def entry(self, backend_name: str) -> dict[str, Any] | None:
        """The entry of the list last fetched for a backend name; None if it has none.
        Ollama's rules: NAME is NAME:latest (Ollama lists the tag), whatever the case: as
        spelled first, then with the tag as spelled (vLLM may list "Foo:latest" and
        "foo:latest" both), then the one id that matches when case is set aside."""
        for wanted in (backend_name, with_default_tag(backend_name)):
            for listed in self._models:
                if listed.get("id") == wanted:
                    return listed
        found = self._list.by_key.get(ollama_key(backend_name)) if self._list else None
        for listed in self._models:
            if found is not None and listed.get("id") == found:
                return listed
        return None


def _by_key(ids: frozenset[str]) -> dict[str, str]:
    """``ids`` by :func:`ollama_key`, leaving out a key two ids share (``Foo`` and
    ``foo`` listed both: which one a third spelling means cannot be told)."""
    found: dict[str, str | None] = {}
    for backend_id in ids:
        key = ollama_key(backend_id)
        found[key] = None if key in found else backend_id
    return {key: backend_id for key, backend_id in found.items() if backend_id is not None}


async def backend_name_for(call: Call, name: str) -> str:
    """The backend's name for a client's model (:func:`_resolved`); a NAME:latest fetches
    the list if there is none (waiting at most LIST_WAIT_SECONDS). A name the list holds
    under another spelling (case, ``library/``, the tag) is counted under that one (one
    model, one label); a mapped one keeps its client name as its label."""
    catalog: ModelCatalog = call.app.catalog  # type: ignore[attr-defined]
    if call.app.mapper.drops_tag(name):
        await catalog.lists(call, name)  # vLLM's --served-model-name x:latest
    backend_name, listed = _resolved(call, name)
    _count_under(call, name, backend_name, listed)
    return listed


def _resolved(call: Call, name: str) -> tuple[str, str]:
    """The mapping's backend name for a client's model, and the id requests go to, by
    the list last fetched: by Ollama's rule a ``NAME:latest`` the mapping does not name is
    ``NAME`` (Open WebUI adds the tag to every name), unless the backend lists the tagged
    spelling itself (vLLM serving ``--served-model-name x:latest`` takes only that one;
    Ollama's own /v1 takes both); a name the list does not hold as spelled goes as it
    lists it by Ollama's other rules (case, ``library/``: ``ModelCatalog.spelling``)."""
    mapper = call.app.mapper
    catalog: ModelCatalog = call.app.catalog  # type: ignore[attr-defined]
    if mapper.drops_tag(name) and catalog.lists_now(name):
        return name, name
    backend_name = mapper.to_backend(name)
    return backend_name, catalog.spelling(backend_name)


def _count_under(call: Call, name: str, backend_name: str, listed: str) -> None:
    """An unmapped name the list holds under another spelling is counted under that one,
    as the name spelled exactly is (not under an alias the mapping gives that id)."""
    if listed != backend_name and not call.app.mapper.maps(name):
        note_model(call.state, listed)


async def listed_entry(call: Call, name: str, *, counted: bool = True) -> dict[str, Any] | None:
    """The backend's list entry for a client's model: that of the id requests for the
    name go to (:func:`_resolved`), so every route means the same model; None if the
    backend does not list it. A backend that has no list (404/405/501) cannot say: the
    model is assumed to exist and the backend decides when it is used. ``counted``:
    under the listed name, as requests are."""
    catalog: ModelCatalog = call.app.catalog  # type: ignore[attr-defined]
    try:
        await catalog.models(call)  # the route reads the list: fetched (or refreshed) once
    except UpstreamStatusError as exc:
        if exc.status in _NO_MODEL_LIST:  # as requests would name it (an older list's id)
            return {"id": _resolved(call, name)[1]}
        raise
    backend_name, listed = _resolved(call, name)
    entry = catalog.entry(listed)
    found = entry.get("id") if entry is not None else None
    if counted and isinstance(found, str):
        _count_under(call, name, backend_name, found)
    return entry


async def list_answer(call: Call, build: ListAnswer) -> bytes:
    """``build(models, mapper)`` of the backend's list (:meth:`ModelCatalog.listed`) as
    the client's JSON. The same list and mapping give the same bytes (``/api/ps`` builds
    a template, its expiries put in per request: :meth:`ModelCatalog.split`), so it is
    written once per list, then answered as written (the same bytes fetched again are the
    same list), as Open WebUI polls every few seconds. Built and encoded in a JSON thread
    when the list came in a body over OFF_LOOP_BYTES, on the loop below: OpenRouter's
    1.7 MB list of 600 models took 2-3 ms of the loop (``/v1/models`` writes it whole,
    ``/api/tags`` a digest per model). The thread reads the list and the mapping, neither
    of which anyone changes (a new list replaces the old one whole): waited for all the
    same, as the rule for objects a request holds is (json_threads)."""
    catalog: ModelCatalog = call.app.catalog  # type: ignore[attr-defined]
    models = await catalog.listed(call)
    if (body := catalog.written(build, models)) is not None:
        return body
    body = await by_size(catalog.list_bytes, _encoded, build, models, call.app.mapper)
    catalog.keep_written(build, models, body)
    return body


def _encoded(build: ListAnswer, models: list[dict[str, Any]], mapper: ModelMapper) -> bytes:
    return compact_json(build(models, mapper))
