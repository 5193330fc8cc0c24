"""How the coordinator reaches a party. The protocol only needs request/reply to named parties.

`InProcessTransport` calls party objects directly (the fast path and the reference); the Flower transport in
server/flower_server.py carries the same envelopes through a SuperLink to SuperNodes.
"""

from __future__ import annotations

from typing import Protocol

from fedscore.shared.protocol.messages import Envelope


class Party(Protocol):
    name: str

    def handle(self, message: Envelope) -> Envelope: ...


class Transport(Protocol):
    name: str

    def exchange(self, messages: list[Envelope]) -> list[Envelope]:
        """Deliver each message to its recipient party and return the replies in the same order."""
        ...


class InProcessTransport:
    """Parties as objects in this process. Payloads still cross as bytes so both transports run the same code."""

    name = "inprocess"

    def __init__(self, parties: dict[str, Party]) -> None:
        self.parties = parties

    def exchange(self, messages: list[Envelope]) -> list[Envelope]:
        return [self.parties[message.header.recipient].handle(message) for message in messages]
