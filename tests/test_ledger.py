"""The ledger of Responses API usage still owed to the metrics, without sockets."""

from __future__ import annotations

from trioproxy.ledger import Counted, ResponsesLedger, finished_usage, pending_id
from trioproxy.translate import ReplayedResponsesObserver


def test_owed_usage_is_settled_once_for_the_rest_only() -> None:
    ledger = ResponsesLedger()
    ledger.owe("resp_1", Counted(0, 12))  # a stream cut after 12 tokens
    usage = {"input_tokens": 5, "output_tokens": 40}
    assert ledger.settle("resp_1", usage) == (5, 28)
    assert ledger.settle("resp_1", usage) is None  # once
    assert ledger.settle("resp_2", usage) is None  # nothing owed
    ledger.owe("resp_3", Counted())
    assert ledger.settle("resp_3", None) is None and ledger.owed("resp_3") is not None
    ledger.owe("resp_4", Counted(0, 50))  # counted more than the usage says: never negative
    assert ledger.settle("resp_4", {"input_tokens": 1, "output_tokens": 30}) == (1, 0)


def test_the_ledger_is_bounded_oldest_first() -> None:
    ledger = ResponsesLedger(limit=2)
    for n in range(3):
        ledger.owe(f"resp_{n}", Counted())
    assert len(ledger) == 2 and ledger.owed("resp_0") is None


def test_an_id_too_long_to_be_polled_is_not_owed() -> None:
    """The routes by id refuse an id over 1,024 characters: owing a backend's longer id
    would only hold it (of any length) in memory until it is pushed out."""
    ledger = ResponsesLedger()
    ledger.owe("r" * 1024, Counted())
    ledger.owe("r" * 1025, Counted())
    assert len(ledger) == 1 and ledger.owed("r" * 1025) is None


def test_finished_and_pending_responses() -> None:
    done = {"id": "resp_1", "status": "completed", "usage": {"input_tokens": 1}}
    assert finished_usage(done) == ("resp_1", {"input_tokens": 1})
    assert finished_usage({"id": "resp_1", "status": "queued"}) is None
    assert pending_id({"id": "resp_1", "status": "queued"}) == "resp_1"
    assert pending_id(done) is None and pending_id(None) is None


def test_a_replayed_stream_counts_only_what_is_owed_and_settles_it_at_once() -> None:
    closing = (
        '{"type":"response.completed","sequence_number":9,"response":{"status":"completed",'
        '"usage":{"input_tokens":5,"output_tokens":40}}}'
    )
    created = (
        '{"type":"response.created","sequence_number":0,"response":{"id":"resp_1",'
        '"model":"gpt-x","status":"in_progress"}}'
    )
    delta = '{"type":"response.output_text.delta","sequence_number":3,"delta":"hi"}'
    ledger = ResponsesLedger()
    counted_before = ReplayedResponsesObserver(ledger, "resp_0")
    ledger.owe("resp_1", Counted(0, 12))
    owed = ReplayedResponsesObserver(ledger, "resp_1")
    for watcher in (counted_before, owed):
        for data in (created, delta, closing):
            watcher.feed_text(data, 1)
    assert counted_before.completion_tokens is None and not counted_before.settled
    assert (owed.prompt_tokens, owed.completion_tokens, owed.settled) == (5, 28, True)
    assert owed.content_chunks == 0 and owed.first_token_ns is None and owed.progressed
    assert (owed.response_id, owed.response_model) == ("resp_1", "gpt-x")
    # settled the moment the closing event came: a poll at the same time counts nothing
    assert ledger.settle("resp_1", {"input_tokens": 5, "output_tokens": 40}) is None
