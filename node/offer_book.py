"""Offers changed through the API, kept in ``offers.json`` and laid over the config's.

Each entry replaces the config's offer of the same name, adds a new one, or (as
``null``) withdraws it, so a price set from the dashboard survives a restart.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import trio
from pydantic import BaseModel, ValidationError

from dht.offers import Offer
from dht.publisher import validation_summary
from runtime.errors import ClawnodeError, ErrorCode
from runtime.files import DISK_FULL_MESSAGE, DISK_FULL_REASON, save_quietly

log = logging.getLogger(__name__)

OFFER_BOOK_FILE = "offers.json"


class OfferBookFile(BaseModel):
    version: int = 1
    overrides: dict[str, Offer | None] = {}


class OfferBook:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.overrides: dict[str, Offer | None] = {}
        # Entries this version cannot read as an offer (e.g. a price beyond what a quote carries):
        # skipped with the reason, and written back as they were until the owner replaces them.
        self.unreadable: dict[str, str] = {}
        self._unreadable_raw: dict[str, Any] = {}
        self._limiter = trio.CapacityLimiter(1)

    def _load_blocking(self) -> None:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            entries = raw["overrides"]
            if not isinstance(entries, dict):
                raise ValueError("overrides is not an object")
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, RecursionError):
            # Keep the damaged file for its owner to inspect; run on the config's offers.
            self.path.replace(self.path.with_suffix(".damaged"))
            return
        for name, entry in entries.items():
            try:
                self.overrides[name] = None if entry is None else Offer.model_validate(entry)
            except ValidationError as error:
                self.unreadable[name] = f"schema_invalid: {validation_summary(error)}"
                self._unreadable_raw[name] = entry
                log.warning("stored offer %s is skipped: it is not a valid offer", name)

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
        """Store the change, or raise ``E_UNAVAILABLE`` (``disk_full``) with nothing changed when the
        data dir cannot take it: an offer that would be lost at the next restart is not accepted."""
        overrides = {**self.overrides, name: offer}
        unreadable_raw = {key: value for key, value in self._unreadable_raw.items() if key != name}
        data = OfferBookFile(overrides=overrides).model_dump(mode="json")
        data["overrides"].update(unreadable_raw)
        text = json.dumps(data, indent=1)
        if not await trio.to_thread.run_sync(save_quietly, self.path, text, limiter=self._limiter):
            raise ClawnodeError(ErrorCode.UNAVAILABLE, DISK_FULL_MESSAGE, DISK_FULL_REASON)
        self.overrides = overrides
        self.unreadable.pop(name, None)
        self._unreadable_raw = unreadable_raw
