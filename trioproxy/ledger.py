"""Tokens the Responses API still owes the metrics (sans-I/O).

Most responses are counted by the request that creates them: its reply, or its stream's
closing event, carries ``usage``. Two kinds are not: a ``background`` response answers
"queued" with no usage, and a stream cut before its closing event counted only the tokens
it carried. Their usage arrives later, on a ``GET /v1/responses/{id}`` (or a resumed
stream, or a cancel) once the response is finished. The ledger remembers what was counted
for such ids, so that the later request counts the rest, once.

Bounded (the oldest entries go first). One process keeps it in memory
(:class:`ResponsesLedger`); the workers of ``--workers N`` share one in their run directory
(:mod:`.shared_ledger`), so a poll answered by another worker than the one that created
the response counts it too. Either way tokens can be missed, never counted twice.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from .jsonutil import whole_number

MAX_OWED = 10_000
# The longest id the routes by id take (``routes_openai``): a longer one can never be
# polled, so owing it would only hold the backend's id, of any length, until it is pushed
# out (10,000 of them could hold gigabytes); the ledger stays within about 10 MB.
MAX_ID_CHARS = 1024
FINISHED = frozenset({"completed", "incomplete", "failed", "cancelled"})


@dataclass(slots=True)
class Counted:
    """What a response's earlier requests counted: input and output tokens."""

    input_tokens: int = 0
    output_tokens: int = 0


class Ledger(Protocol):
    """What the routes use of a ledger: the in-memory one or the workers' shared one."""

    shared: ClassVar[bool]  # its ``owe`` writes files: await it in a thread where one can

    def owe(self, response_id: str, counted: Counted) -> None: ...

    def owe_soon(self, response_id: str, counted: Counted) -> None:
        """``owe`` from code that cannot wait (a stream's end): never blocks."""

    def owed(self, response_id: str) -> Counted | None: ...

    def settle(self, response_id: str, usage: Any) -> tuple[int, int] | None: ...

    def forget(self, response_id: str) -> None: ...

    def __len__(self) -> int: ...


class ResponsesLedger:
    """One process's ledger, in memory."""

    __slots__ = ("_limit", "_owed")
    shared: ClassVar[bool] = False

    def __init__(self, limit: int = MAX_OWED) -> None:
        self._limit = limit
        self._owed: OrderedDict[str, Counted] = OrderedDict()

    def owe(self, response_id: str, counted: Counted) -> None:
        """``response_id``'s usage is still to come; ``counted`` is what was counted."""
        if len(response_id) > MAX_ID_CHARS:
            return
        self._owed[response_id] = counted
        self._owed.move_to_end(response_id)
        while len(self._owed) > self._limit:
            self._owed.popitem(last=False)

    owe_soon = owe

    def owed(self, response_id: str) -> Counted | None:
        return self._owed.get(response_id)

    def settle(self, response_id: str, usage: Any) -> tuple[int, int] | None:
        """The tokens still to count for ``response_id`` given its final ``usage``
        (input, output), once; None if nothing is owed or ``usage`` says nothing."""
        counted = self._owed.get(response_id)
        if counted is None or not isinstance(usage, dict):
            return None
        # as usage_totals and rest do, inline: one process's cost as it was
        total_in = whole_number(usage.get("input_tokens"))
        total_out = whole_number(usage.get("output_tokens"))
        if total_in is None or total_out is None:
            return None
        del self._owed[response_id]
        return max(total_in - counted.input_tokens, 0), max(total_out - counted.output_tokens, 0)

    def forget(self, response_id: str) -> None:
        self._owed.pop(response_id, None)

    def __len__(self) -> int:
        return len(self._owed)


def usage_totals(usage: Any) -> tuple[int, int] | None:
    """The input and output tokens a finished response's ``usage`` says, if it says both."""
    if not isinstance(usage, dict):
        return None
    total_in = whole_number(usage.get("input_tokens"))
    total_out = whole_number(usage.get("output_tokens"))
    if total_in is None or total_out is None:
        return None
    return total_in, total_out


def rest(counted: Counted, totals: tuple[int, int]) -> tuple[int, int]:
    """What is left to count of ``totals`` once ``counted`` was (never below zero)."""
    return max(totals[0] - counted.input_tokens, 0), max(totals[1] - counted.output_tokens, 0)


def finished_usage(response: Any) -> tuple[str, Any] | None:
    """(id, usage) of a finished Responses API ``response`` object, else None."""
    if not isinstance(response, dict) or not _finished(response):
        return None
    response_id = response.get("id")
    return (response_id, response.get("usage")) if isinstance(response_id, str) else None


def _finished(response: dict[str, Any]) -> bool:
    status = response.get("status")  # a list or an object there: unhashable, no status
    return isinstance(status, str) and status in FINISHED


def pending_id(response: Any) -> str | None:
    """The id of a response object that is not finished yet (a queued background one)."""
    if not isinstance(response, dict) or _finished(response):
        return None
    response_id = response.get("id")
    return response_id if isinstance(response_id, str) else None
