"""Offers changed through the API, kept in ``offers.json`` and laid over the config's.

Each entry replaces the config's offer of the same name, adds a new one, or (as
``null``) withdraws it, so a price set from the dashboard survives a restart.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio
from pydantic import BaseModel, ValidationError

from dht.offers import Offer
from runtime.files import write_atomically

OFFER_BOOK_FILE = "offers.json"


class OfferBookFile(BaseModel):
    version: int = 1
    overrides: dict[str, Offer | None] = {}


class OfferBook:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.overrides: dict[str, Offer | None] = {}
        self._limiter = trio.CapacityLimiter(1)

    def _load_blocking(self) -> None:
        try:
            data = OfferBookFile.model_validate(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return
        except (ValueError, ValidationError):
            # Keep the damaged file for its owner to inspect; run on the config's offers.
            self.path.replace(self.path.with_suffix(".damaged"))
            return
        self.overrides = dict(data.overrides)

    async def load(self) -> None:
        await trio.to_thread.run_sync(self._load_blocking, limiter=self._limiter)

    def effective(self, configured: list[Offer]) -> list[Offer]:
        offers = {offer.name: offer for offer in configured}
        for name, override in self.overrides.items():
            if override is None:
                offers.pop(name, None)
            else:
                offers[name] = override
        return list(offers.values())

    async def record(self, name: str, offer: Offer | None) -> None:
        self.overrides[name] = offer
        text = OfferBookFile(overrides=self.overrides).model_dump_json(indent=1)
        await trio.to_thread.run_sync(write_atomically, self.path, text, limiter=self._limiter)
