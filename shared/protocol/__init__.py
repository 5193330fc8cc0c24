"""The protocol both parties and the coordinator speak: typed message headers with opaque payloads and the
`MessageKind` enum (`messages`), the typed header bodies and ledger report (`bodies`), the transport interface and
its in-process implementation (`transport`), the Flower encoding (`flower_codec`), and the keyed
train/validation/test split both parties derive without talking (`splits`)."""
