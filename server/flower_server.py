"""The Flower ServerApp: runs the same Coordinator as `fedscore train`, over a Flower Grid.

`FlowerTransport` is the whole adapter: it finds which SuperNode is which party (a `whoami` query, since the
ServerApp cannot read node configs), pushes our envelopes as Flower messages and polls for the replies in a short
loop (Grid.send_and_receive sleeps 3 s between pulls). It never decodes a payload.

A party that is down fails the run, never hangs it: a party whose SuperNode is not connected (absent from the
SuperLink's node list, or reported unavailable by it) for `party_timeout_s` (`--party-timeout`, RUN_DIR/launch.json,
default 180 s) stops the run with a message naming the party; the coordinator's checkpoint lets `--resume` continue
it. A party that is up but slow is waited for up to `timeout_s` per exchange.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedscore.shared.protocol.flower_codec import MESSAGE_TYPE, WHOAMI_TYPE, decode, encode
from fedscore.shared.protocol.messages import PARTIES, Envelope
from fedscore.shared.waiting import wait_until

app = ServerApp()


class PartyDown(RuntimeError):
    """A party's SuperNode stayed disconnected for the party timeout: the run stops (and can be resumed)."""


NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE: the node missed its heartbeats


class FlowerTransport:
    name = "flower"

    def __init__(self, grid: Grid, poll_s: float = 0.05, timeout_s: float = 900.0,
                 party_timeout_s: float = 180.0) -> None:
        self.grid = grid
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.party_timeout_s = party_timeout_s
        self.nodes: dict[str, int] = {}

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
        for message_id, reply in zip(ids, out, strict=True):
            if reply.has_error():
                party = self._party(destination[message_id])
                if reply.error.code == NODE_UNAVAILABLE:
                    raise PartyDown(f"the {party} party is down: its SuperNode stopped sending heartbeats "
                                    f"({reply.error.reason}); the run stops at its last checkpoint")
                raise RuntimeError(f"Flower error from the {party} party's node: {reply.error.reason}")
        return out

    def discover(self, wait_s: float | None = None) -> dict[str, int]:
        """Ask every connected SuperNode which party it serves; wait (the party timeout) until both are there."""
        connected: list[int] = []

        def enough() -> bool:
            connected[:] = self.grid.get_node_ids()
            return len(connected) >= len(PARTIES)

        wait_until(enough, self.party_timeout_s if wait_s is None else wait_s, 0.5,
                   lambda: f"a party is down: only {len(connected)} of {len(PARTIES)} SuperNodes connected",
                   PartyDown)
        node_ids = list(connected)
        queries = [Message(content=RecordDict(), dst_node_id=n, message_type=WHOAMI_TYPE) for n in node_ids]
        for node_id, reply in zip(node_ids, self._round_trip(queries), strict=True):
            party = str(reply.content.config_records["whoami"]["party"])
            if party in self.nodes:
                raise RuntimeError(f"two SuperNodes claim to be the {party} party")
            self.nodes[party] = node_id
        missing = [p for p in PARTIES if p not in self.nodes]
        if missing:
            raise RuntimeError(f"no SuperNode serves party {', '.join(missing)}")
        return self.nodes

    def exchange(self, messages: list[Envelope]) -> list[Envelope]:
        flower = [Message(content=encode(m), dst_node_id=self.nodes[m.header.recipient], message_type=MESSAGE_TYPE)
                  for m in messages]
        return [decode(reply.content) for reply in self._round_trip(flower)]


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedscore.server.coordinator import (
        CHECKPOINT_FILE,
        CheckpointError,
        Coordinator,
        PartyRefused,
        RunResult,
        new_run_id,
    )
    from fedscore.server.outcome import write_outcome
    from fedscore.shared.config import FedConfig

    run_dir = Path(str(context.run_config["run-dir"]))
    config = FedConfig.model_validate_json((run_dir / "config.json").read_text())
    launch = json.loads((run_dir / "launch.json").read_text()) if (run_dir / "launch.json").exists() else {}
    progress_file = run_dir / "progress.jsonl"

    def progress(stage: str, done: int, total: int) -> None:
        with progress_file.open("a") as handle:
            handle.write(json.dumps({"stage": stage, "done": done, "total": total, "t": time.time()}) + "\n")

    transport = FlowerTransport(grid, party_timeout_s=float(launch.get("party_timeout_s", 180.0)))
    try:
        if (run_dir / CHECKPOINT_FILE).exists():  # only `--resume` reaches a run folder with one (new ones are empty)
            coordinator = Coordinator.resume(config, transport, run_dir, progress)
        else:
            coordinator = Coordinator(config, transport, progress=progress, run_id=new_run_id(run_dir.name),
                                      checkpoint_dir=run_dir)
    except CheckpointError as exc:
        write_outcome(run_dir, RunResult(transport=transport.name), error={"party": "", "request": "",
                                                                           "reason": str(exc)})
        return
    start = time.perf_counter()

    def finish(error: dict[str, str] | None) -> None:
        coordinator.result.timing["serverapp_s"] = time.perf_counter() - start
        write_outcome(run_dir, coordinator.result, error=error)

    try:
        transport.discover()
        coordinator.run()
        finish(None)
    except PartyRefused as exc:
        finish({"party": exc.party, "request": exc.kind, "reason": exc.reason})
    except PartyDown as exc:  # the launcher says how to resume
        finish({"party": "", "request": "", "reason": str(exc)})
    except Exception as exc:
        finish({"party": "", "request": "", "reason": repr(exc)})
        raise
