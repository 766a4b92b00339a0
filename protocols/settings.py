"""Settings models owned by the protocols: ``[market]`` is read by the lease market.

``node/config.py`` builds the whole config from these (the keys, defaults, bounds and environment
names are the same as when they lived there); protocols/ must not import node/.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A config section: unknown keys are an error, values never change after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MarketSection(Section):
    receipt_every_units: int = Field(1000, ge=1, description="the provider signs a usage receipt every N units")
    receipt_every_s: int = Field(30, ge=1, le=3600, description="... or every T seconds with unreceipted usage")
    countersign_timeout_s: int = Field(
        60, ge=1, le=86_400, description="service pauses when a receipt stays unsigned this long"
    )
    abandon_after_s: int = Field(
        300, ge=1, le=86_400, description="the lease ends when the consumer stays silent this long"
    )
    claim_every_s: int = Field(
        300, ge=1, le=86_400, description="how often a provider claims countersigned usage (and at the end)"
    )
    quote_valid_s: int = Field(60, ge=1, le=3600, description="how long a quote can be opened")
    max_lease_s: int = Field(86_400, ge=1, le=30 * 86_400, description="the longest lease this node grants")
    max_requests: int = Field(100_000, ge=1, description="requests per lease at most")
    rate_per_minute: int = Field(600, ge=1, description="requests per minute per lease at most")
    trusted_peers: list[str] = Field(
        default_factory=list, description="peer ids served post-paid without an escrow lock"
    )
    postpaid_cap: int = Field(0, ge=0, description="the most a trusted peer's post-paid lease may owe, wei")
    # Payment channels (issue 20; protocols/machines/channel.py): one escrow per consumer-provider pair.
    channel_leases_per_lock: int = Field(
        10, ge=1, le=10_000, description="a new payment channel locks this many lease budgets"
    )
    channel_duration_s: int = Field(86_400, ge=60, le=30 * 86_400, description="a new channel's lock lasts this long")
    channel_idle_close_s: int = Field(
        600, ge=1, le=30 * 86_400, description="the consumer stops drawing on a channel unused this long"
    )
    channel_claim_idle_s: int = Field(
        300, ge=1, le=30 * 86_400, description="the provider closes (claims and settles) a channel unused this long"
    )
    channel_margin_s: int = Field(
        600, ge=0, le=86_400, description="no lease ends within this of its channel's deadline; closing starts then"
    )
    # Layers of a model run for lease holders (issue 24, docs/split.md): each a sandboxed process.
    layer_servers: int = Field(
        0, ge=0, le=16, description="layer servers run at once for lease holders' split models; 0: none"
    )
