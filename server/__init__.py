"""The coordinator: drives rounds, relays opaque payloads, collects shared metrics."""
