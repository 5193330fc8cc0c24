"""The Flower ServerApp: runs the same Coordinator as `fedscore train`, over a Flower Grid.

`FlowerTransport` is the whole adapter: it pushes our envelopes as Flower messages and polls for the replies in a
short loop (Grid.send_and_receive sleeps 3 s between pulls). It never decodes a payload. The ServerApp cannot read
node configs, so it learns which SuperNode serves which party from the first exchange (the setup, or a resumed
run's first step): that goes to every node, each opening the envelope addressed to its own party (or, with none for
it, answering only which party it serves), and each reply names its sender.

When the SuperLink authenticates SuperNodes, the launcher passes the node ids it registered (`nodes` in the run
config): the ServerApp then talks to those two nodes only, whatever else is connected, and each must answer as the
party it was registered for. With `capture` (tests only) it appends every reply it receives, every record in it,
to RUN_DIR/capture/serverapp-received.bin, so a test can search everything the ServerApp held for what it must
never learn.

A party that is down fails the run, never hangs it: a party whose SuperNode is not connected (absent from the
SuperLink's node list, or reported unavailable by it) for `party_timeout_s` (`--party-timeout`, RUN_DIR/launch.json,
default 180 s) stops the run with a message naming the party; the coordinator's checkpoint lets `--resume` continue
it. A party that is up but slow is waited for up to `timeout_s` per exchange.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedscore.flower.patches import node_unavailable
from fedscore.shared.protocol.flower_codec import MESSAGE_TYPE, decode, encode, encode_addressed, identity
from fedscore.shared.protocol.messages import PARTIES, Envelope
from fedscore.shared.waiting import wait_until

app = ServerApp()


class PartyDown(RuntimeError):
    """A party's SuperNode stayed disconnected for the party timeout: the run stops (and can be resumed)."""


NODE_UNAVAILABLE = node_unavailable()  # flwr's ErrorCode.NODE_UNAVAILABLE: the node missed its heartbeats


class FlowerTransport:
    name = "flower"

    def __init__(self, grid: Grid, poll_s: float = 0.05, timeout_s: float = 900.0,
                 party_timeout_s: float = 180.0, allowed: dict[str, int] | None = None,
                 capture: Path | None = None) -> None:
        self.grid = grid
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.party_timeout_s = party_timeout_s
        self.nodes: dict[str, int] = {}
        self.allowed = allowed or {}  # party -> the node id registered for it; empty: any connected node
        self.capture = capture

    def _record(self, reply: Message) -> None:
        """Test mode: every record of a received message, length-prefixed, appended to the capture file."""
        assert self.capture is not None
        parts: list[bytes] = []
        for name, config in reply.content.config_records.items():
            parts += [name.encode(), json.dumps(dict(config), default=str).encode()]
        for name, arrays in reply.content.array_records.items():
            parts += [name.encode(), *(array.numpy().tobytes() for array in arrays.values())]
        for name, metrics in reply.content.metric_records.items():
            parts += [name.encode(), json.dumps(dict(metrics), default=str).encode()]
        if reply.has_error():
            parts.append(str(reply.error.reason).encode())
        self.capture.parent.mkdir(parents=True, exist_ok=True)
        with self.capture.open("ab") as handle:
            handle.write(b"".join(struct.pack(">Q", len(part)) + part for part in parts))

    def _party(self, node_id: int) -> str:
        return next((p for p, n in self.nodes.items() if n == node_id), f"node {node_id}")

    def _down(self, party: str, seconds: float) -> PartyDown:
        return PartyDown(f"the {party} party is down: its SuperNode has not been connected for {seconds:.0f} s "
                         f"(party timeout {self.party_timeout_s:.0f} s); the run stops at its last checkpoint")

    def _round_trip(self, messages: list[Message]) -> list[Message]:
        ids = list(self.grid.push_messages(messages))
        pending = {i for i in ids if i}
        if len(pending) != len(messages):
            raise RuntimeError("the SuperLink did not accept every message")
        destination = {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=True)}
        replies: dict[str, Message] = {}
        absent_since: dict[int, float] = {}
        next_check = [0.0]

        def all_in() -> bool:
            for reply in self.grid.pull_messages(pending):
                replies[reply.metadata.reply_to_message_id] = reply
                pending.discard(reply.metadata.reply_to_message_id)
            if pending and time.monotonic() >= next_check[0]:  # is every node we wait for still connected?
                next_check[0] = time.monotonic() + 1.0
                connected = set(self.grid.get_node_ids())
                for node in {destination[i] for i in pending}:
                    if node in connected:
                        absent_since.pop(node, None)
                    elif time.monotonic() - absent_since.setdefault(node, time.monotonic()) > self.party_timeout_s:
                        raise self._down(self._party(node), time.monotonic() - absent_since[node])
            return not pending

        wait_until(all_in, self.timeout_s, self.poll_s,
                   lambda: f"no reply from the {', '.join(sorted(self._party(destination[i]) for i in pending))} "
                           "party (up, but slower than the reply timeout)")
        out = [replies[i] for i in ids]
        if self.capture is not None:
            for reply in out:
                self._record(reply)
        for message_id, reply in zip(ids, out, strict=True):
            if reply.has_error():
                party = self._party(destination[message_id])
                if reply.error.code == NODE_UNAVAILABLE:
                    raise PartyDown(f"the {party} party is down: its SuperNode stopped sending heartbeats "
                                    f"({reply.error.reason}); the run stops at its last checkpoint")
                raise RuntimeError(f"Flower error from the {party} party's node: {reply.error.reason}")
        return out

    def _connected_nodes(self, wait_s: float | None = None) -> list[int]:
        """The nodes to open the run with: the registered ones once all are connected, or (no registration) every
        connected node once there are as many as parties; a party still absent after the party timeout is down."""
        connected: list[int] = []

        def enough() -> bool:
            connected[:] = self.grid.get_node_ids()
            if self.allowed:
                return set(self.allowed.values()) <= set(connected)
            return len(connected) >= len(PARTIES)

        def missing_nodes() -> str:
            if self.allowed:
                absent = [f"{p} (node {n})" for p, n in self.allowed.items() if n not in connected]
                return f"a party is down: the registered SuperNode(s) of {', '.join(absent)} did not connect"
            return f"a party is down: only {len(connected)} of {len(PARTIES)} SuperNodes connected"

        wait_until(enough, self.party_timeout_s if wait_s is None else wait_s, 0.1, missing_nodes, PartyDown)
        return list(self.allowed.values()) if self.allowed else list(connected)

    def _exchange_discovering(self, messages: list[Envelope]) -> list[Envelope]:
        """The first exchange: every node gets every envelope and opens its own party's (a node with none answers
        which party it serves); the replies say which node is which party, so finding them costs no exchange."""
        node_ids = self._connected_nodes()
        flower = [Message(content=encode_addressed(messages), dst_node_id=n, message_type=MESSAGE_TYPE)
                  for n in node_ids]
        replies: dict[str, Envelope] = {}
        for node_id, reply in zip(node_ids, self._round_trip(flower), strict=True):
            envelope = None if identity(reply.content) else decode(reply.content)
            party = identity(reply.content) or envelope.header.sender  # type: ignore[union-attr]
            if self.allowed and self.allowed.get(party) != node_id:
                raise RuntimeError(f"node {node_id} says it serves {party!r}, but was not registered for it")
            if party in self.nodes:
                raise RuntimeError(f"two SuperNodes claim to be the {party} party")
            self.nodes[party] = node_id
            if envelope is not None:
                replies[party] = envelope
        missing = [p for p in PARTIES if p not in self.nodes]
        if missing:
            raise RuntimeError(f"no SuperNode serves party {', '.join(missing)}")
        return [replies[m.header.recipient] for m in messages]

    def exchange(self, messages: list[Envelope]) -> list[Envelope]:
        if not self.nodes:
            return self._exchange_discovering(messages)
        flower = [Message(content=encode(m), dst_node_id=self.nodes[m.header.recipient], message_type=MESSAGE_TYPE)
                  for m in messages]
        return [decode(reply.content) for reply in self._round_trip(flower)]


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedscore.server.coordinator import (
        CheckpointError,
        Coordinator,
        PartyRefused,
        RunResult,
        new_run_id,
    )
    from fedscore.server.outcome import write_outcome
    from fedscore.shared.run_folder import DEFAULT_PARTY_TIMEOUT_S, Refusal, RunFolder

    run_dir = Path(str(context.run_config["run-dir"]))
    folder = RunFolder(run_dir)
    config = folder.read_config()
    # a deployment's coordinator (`fedscore run`) has no launch.json: the party timeout is then the default
    party_timeout_s = folder.read_launch().party_timeout_s if folder.launch.exists() else DEFAULT_PARTY_TIMEOUT_S
    progress_file = folder.progress

    def progress(stage: str, done: int, total: int) -> None:
        with progress_file.open("a") as handle:
            handle.write(json.dumps({"stage": stage, "done": done, "total": total, "t": time.time()}) + "\n")

    allowed = {party: int(node) for party, node in json.loads(str(context.run_config.get("nodes", "{}"))).items()}
    capture = folder.capture / "serverapp-received.bin" if context.run_config.get("capture") else None
    transport = FlowerTransport(grid, party_timeout_s=party_timeout_s, allowed=allowed,
                                capture=capture)
    try:
        if folder.checkpoint.exists():  # only `--resume` reaches a run folder with one (new ones are empty)
            coordinator = Coordinator.resume(config, transport, run_dir, progress)
        else:
            coordinator = Coordinator(config, transport, progress=progress, run_id=new_run_id(run_dir.name),
                                      checkpoint_dir=run_dir)
    except CheckpointError as exc:
        write_outcome(run_dir, RunResult(transport=transport.name), error=Refusal.failure(str(exc)))
        return
    start = time.perf_counter()

    def finish(error: Refusal | None) -> None:
        coordinator.result.timing["serverapp_s"] = time.perf_counter() - start
        write_outcome(run_dir, coordinator.result, error=error)

    try:
        coordinator.run()
        finish(None)
    except PartyRefused as exc:
        finish(Refusal(party=exc.party, request=exc.kind, reason=exc.reason))
    except PartyDown as exc:  # the launcher says how to resume
        finish(Refusal.failure(str(exc)))
    except Exception as exc:
        finish(Refusal.failure(repr(exc)))
        raise
