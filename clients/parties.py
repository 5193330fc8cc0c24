"""Build a party object from its settings (used by the in-process runner and the Flower ClientApp alike)."""

from __future__ import annotations

from fedscore.clients.base import PartyBase, PartySettings


def make_party(settings: PartySettings) -> PartyBase:
    if settings.party == "payment":
        from fedscore.clients.payment.party import PaymentParty

        return PaymentParty(settings)
    from fedscore.clients.lender.party import LenderParty

    return LenderParty(settings)
