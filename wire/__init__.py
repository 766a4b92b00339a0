"""How bytes travel between peers, below every protocol: length-prefixed frames (``framing``), one
request and one reply per stream (``rpc``), opening a stream over a direct or relayed connection
(``streams``) and the libp2p signed envelope every record and market message travels in (``signed``).

The bottom of the peer-to-peer layers: it imports ``runtime`` (errors) and libp2p, nothing of
``node``, ``protocols``, ``dht`` or ``nat``, all of which build on it.
"""
