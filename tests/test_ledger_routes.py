"""The routes settle the workers' shared Responses API ledger (files) in the metrics'
threads, never on the event loop: a poll, a resumed stream and a delete, through the proxy
served in this process on a real socket (``serving_proxy``; the demo backend in its own
process), with the ledger ``--workers`` gives it. Each counts what is owed once."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trioproxy import app as app_module
from trioproxy.shared_ledger import SharedResponsesLedger

from .conftest import ServerProcess
from .test_large_json import serving_proxy
from .test_metrics_e2e import sse_data


async def _tokens(client: httpx.AsyncClient) -> tuple[float, float]:
    exposition = (await client.get("/metrics")).text
    totals = {"input": 0.0, "output": 0.0}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "trioproxy_tokens_total":
                totals[sample.labels["type"]] += sample.value
    return totals["input"], totals["output"]


async def _until_tokens(client: httpx.AsyncClient, expected: tuple[float, float]) -> None:
    """The metrics are recorded as the request ends, after its reply (and its settling)."""
    with trio.fail_after(10):
        while await _tokens(client) != expected:  # noqa: ASYNC110 (recorded by another task)
            await trio.sleep(0.01)


async def test_polls_and_resumed_streams_settle_the_shared_ledger_in_a_metrics_thread(
    demo_backend: ServerProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before, a poll and a resumed stream's closing event renamed the entry on the event
    loop (one rename per poll: milliseconds on a disk under heavy journal load)."""
    ledger_dir = str(tmp_path / "responses_ledger")
    monkeypatch.setattr(app_module, "_ledger", lambda shared: SharedResponsesLedger(ledger_dir))
    calls: list[tuple[str, str, bool]] = []  # (what, id, on the event loop's thread)
    for name in ("settle", "forget"):
        original = getattr(SharedResponsesLedger, name)

        def watched(self: Any, response_id: str, *args: Any, _o: Any = original) -> Any:
            on_loop = threading.current_thread() is threading.main_thread()
            calls.append((_o.__name__, response_id, on_loop))
            return _o(self, response_id, *args)

        monkeypatch.setattr(SharedResponsesLedger, name, watched)
    other_worker = SharedResponsesLedger(ledger_dir)

    async with serving_proxy(demo_backend.url) as client:
        body = {"model": "demo-chat", "input": "one two three [[tokens=7]]", "background": True}
        queued = (await client.post("/v1/responses", json=body)).json()
        assert queued["status"] == "queued"
        done = (await client.get(f"/v1/responses/{queued['id']}")).json()
        assert done["status"] == "completed"
        counted = (done["usage"]["input_tokens"], 7)
        await _until_tokens(client, counted)
        assert other_worker.owed(queued["id"]) is None

        # a stream the backend drops after 6 tokens, resumed to its end
        cut = {"model": "demo-chat", "input": "cut [[tokens=40]] [[drop_after=6]]", "stream": True}
        streamed = (await client.post("/v1/responses", json=cut)).text
        assert '"error"' in sse_data(streamed)[-1]
        created = json.loads(sse_data(streamed)[0])["response"]
        resumed = await client.get(f"/v1/responses/{created['id']}", params={"stream": "true"})
        usage = json.loads(sse_data(resumed.text)[-1])["response"]["usage"]
        await _until_tokens(client, (counted[0] + usage["input_tokens"], counted[1] + 40))
        assert other_worker.owed(created["id"]) is None

        deleted = await client.delete(f"/v1/responses/{created['id']}")
        assert deleted.status_code == 200, deleted.text

    assert calls  # the poll's, the resumed stream's (once at least), the delete's
    assert {(what, response_id) for what, response_id, _ in calls} == {
        ("settle", queued["id"]),
        ("settle", created["id"]),
        ("forget", created["id"]),
    }
    assert not any(on_loop for _, _, on_loop in calls)
