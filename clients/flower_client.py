"""The Flower ClientApp: a thin forwarder from Flower to this node's party.

Flower starts a fresh process for every message. With a party worker (`worker-socket` and `worker-token` in the
node config; `fedscore federate` starts one beside each SuperNode, clients/worker.py) this module only moves the
header JSON and payload bytes between Flower and the worker, importing flwr and the standard library alone: the
party's data, model and state stay in the worker's memory. Without a worker (a node started by hand) the party is
rebuilt from its node config and state directory for each message, as a fallback.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query("fedscore")
def handle(message: Message, context: Context) -> Message:
    from fedscore.shared.protocol.flower_codec import decode_raw, encode_raw, identity_reply, is_for

    config = context.node_config
    party = str(config.get("party", ""))
    if not is_for(message.content, party):  # the opening exchange of a resumed run may have nothing for us
        return Message(content=identity_reply(party), reply_to=message)
    header, payload = decode_raw(message.content, party=party)
    if "worker-socket" in config:
        from fedscore.clients.worker import forward

        header, payload = forward(str(config["worker-socket"]), str(config.get("worker-token", "")), header, payload)
    else:
        header, payload = _in_this_process(context, header, payload)
    return Message(content=encode_raw(header, payload), reply_to=message)


def _in_this_process(context: Context, header: str, payload: bytes) -> tuple[str, bytes]:
    """The fallback without a worker: rebuild the party here (imports torch; reloads the state from disk)."""
    from fedscore.clients.base import PartySettings
    from fedscore.clients.parties import make_party
    from fedscore.shared.privacy.budgets import parse_budgets
    from fedscore.shared.protocol.messages import Envelope, Header

    config = context.node_config
    missing = [k for k in ("party", "data-path", "state-dir", "home", "secret") if k not in config]
    if missing:
        raise ValueError(f"node config is missing {', '.join(missing)} (set them with --node-config)")
    settings = PartySettings(party=config["party"], data_path=config["data-path"], state_dir=config["state-dir"],
                             home=config["home"], secret=config["secret"],
                             budgets=parse_budgets(str(config.get("budgets", ""))),
                             peer_public_key=str(config.get("peer-public-key", "")))
    reply = make_party(settings).handle(Envelope(header=Header.model_validate_json(header), payload=payload))
    return reply.header.model_dump_json(), reply.payload
