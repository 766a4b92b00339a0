"""The bootstrap peers a node uses when its config names none of its own.

The public clawnode network has no long-lived bootstrap peers yet, so the list
ships empty: start one with ``clawnode start --role bootstrap`` and give its
address to the others (``--bootstrap`` or ``bootstrap.peers``). Add an entry here
once a public bootstrap peer exists.
"""

from __future__ import annotations

DEFAULT_BOOTSTRAP_PEERS: tuple[str, ...] = ()
