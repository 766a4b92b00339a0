"""What a node serves under a lease: a metered service per capability name.

The lease protocol does not care what is sold. A service turns one request body into a stream of
chunks and says, at the end, exactly how many units it used (tokens counted by the engine, never
estimated); the lease layer authorises the call before and meters the units after. The inference
engine registers its models here; anything else sold by unit plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

Emit = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Usage:
    units: int
    detail: dict[str, int] = field(default_factory=dict)


class MeteredService(Protocol):
    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        """Serve ``body``, sending partial results through ``emit``; return the units used.

        Raise ``ClawnodeError`` (``E_INVALID_ARGUMENT`` for a bad body) to refuse.
        """
        ...


class ServiceRegistry:
    """Capability name → the service that answers it."""

    def __init__(self) -> None:
        self._services: dict[str, MeteredService] = {}

    def register(self, capability: str, service: MeteredService) -> None:
        self._services[capability] = service

    def unregister(self, capability: str) -> None:
        self._services.pop(capability, None)

    def get(self, capability: str) -> MeteredService | None:
        return self._services.get(capability)

    def names(self) -> list[str]:
        return sorted(self._services)
