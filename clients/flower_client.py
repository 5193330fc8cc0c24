"""The Flower ClientApp: a thin adapter that hands each message to this node's party object.

Every message starts a fresh process, so the party is rebuilt from the node config and its state directory; torch
and the party code are imported inside the handler so the `whoami` handshake stays fast.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _settings(context: Context):
    from fedscore.clients.base import PartySettings
    from fedscore.shared.privacy.budgets import parse_budgets

    config = context.node_config
    missing = [k for k in ("party", "data-path", "state-dir", "home", "secret") if k not in config]
    if missing:
        raise ValueError(f"node config is missing {', '.join(missing)} (set them with --node-config)")
    return PartySettings(party=config["party"], data_path=config["data-path"], state_dir=config["state-dir"],
                         home=config["home"], secret=config["secret"],
                         budgets=parse_budgets(str(config.get("budgets", ""))))


@app.query("whoami")
def whoami(message: Message, context: Context) -> Message:
    party = str(context.node_config.get("party", ""))
    return Message(content=RecordDict({"whoami": ConfigRecord({"party": party})}), reply_to=message)


@app.query("fedscore")
def handle(message: Message, context: Context) -> Message:
    from fedscore.clients.parties import make_party
    from fedscore.shared.protocol.flower_codec import decode, encode

    party = make_party(_settings(context))
    reply = party.handle(decode(message.content))
    return Message(content=encode(reply), reply_to=message)
