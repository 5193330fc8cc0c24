"""The Flower ClientApp: a thin forwarder from Flower to this node's party.

Flower starts a fresh process for every message. Every node fedscore starts (`fedscore federate`, `fedscore node`)
has a party worker beside its SuperNode (`worker-socket` and `worker-token` in the node config, clients/worker.py);
this module only moves the header JSON and payload bytes between Flower and the worker, importing flwr and the
standard library alone: the party's data, model, state and secrets stay in the worker's memory, never in the node
config.
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
    if "worker-socket" not in config:
        raise ValueError("node config has no worker-socket: start the node with `fedscore node` (or `fedscore "
                         "federate`), which starts the party's worker beside its SuperNode")
    from fedscore.clients.worker import forward

    header, payload = forward(str(config["worker-socket"]), str(config.get("worker-token", "")), header, payload)
    return Message(content=encode_raw(header, payload), reply_to=message)
