"""The layering rule (docs/architecture.md, "Layers"): no import cycles, imports point down."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tools import import_graph


def test_the_import_graph_has_no_new_violations() -> None:
    new, stale = import_graph.check()
    assert not new, "import graph violations (tests/tools/import_graph.py):\n" + "\n".join(new)
    assert not stale, "fixed, so remove from ALLOWED in tests/tools/import_graph.py:\n" + "\n".join(stale)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_the_check_finds_hidden_cycles_and_wrong_directions(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "node/__init__.py": "",
            "node/host.py": "from nat.autonat import probe\n",
            "nat/__init__.py": "",
            # A function-level import still counts; a TYPE_CHECKING one breaks no module cycle
            # but still counts for the direction and folder rules.
            "nat/autonat.py": "def probe():\n    from node.host import build\n",
            "nat/relay.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import upnp\n",
            "nat/upnp.py": "from nat import relay\n",
            "runtime/__init__.py": "",
            "runtime/ledger.py": "import libp2p.crypto\nfrom dht.offers import Offer\n",
            "dht/__init__.py": "",
            "dht/offers.py": "from runtime import ledger\n",
            "protocols/__init__.py": "",
            "bootstrap/__init__.py": "",
        },
    )
    graph = import_graph.build(tmp_path)
    found = import_graph.violations(graph)
    assert import_graph.type_only_cycles(graph) == [["nat.relay", "nat.upnp", "nat.relay"]]
    assert "module cycle: nat.autonat -> node.host -> nat.autonat" in found
    assert "module cycle: dht.offers -> runtime.ledger -> dht.offers" in found
    assert not any("nat.relay -> nat.upnp" in line or "nat.upnp -> nat.relay" in line for line in found)
    assert "forbidden: nat.autonat imports node.host  [nat must not import node]" in found
    assert "forbidden: runtime.ledger imports libp2p  [runtime must not import libp2p]" in found
    assert "forbidden: runtime.ledger imports dht.offers  [runtime must not import dht]" in found
    assert any(line.startswith("folder cycle among nat, node -- ") for line in found)
    assert any(line.startswith("folder cycle among dht, runtime -- ") for line in found)
    assert len(found) == 7, found


def test_the_peer_to_peer_folders_stack_one_way(tmp_path: Path) -> None:
    """protocols > dht > nat > wire: an import upward is refused even where it closes no cycle."""
    _write(
        tmp_path,
        {
            "protocols/__init__.py": "",
            "protocols/lease.py": "from dht.records import Record\nfrom wire.rpc import request\n",
            "protocols/gossip.py": "",
            "dht/__init__.py": "",
            "dht/records.py": "from protocols.gossip import topic\nfrom wire.signed import seal\n",
            "nat/__init__.py": "",
            "nat/autonat.py": "from dht.records import Record\nfrom wire.rpc import request\n",
            "nat/addresses.py": "",
            "wire/__init__.py": "",
            "wire/rpc.py": "from nat.addresses import ranked\nfrom runtime.errors import ErrorCode\n",
            "wire/signed.py": "",
            "runtime/__init__.py": "",
            "runtime/errors.py": "from wire import signed\n",
        },
    )
    found = import_graph.violations(import_graph.build(tmp_path))
    assert sorted(line for line in found if line.startswith("forbidden")) == [
        "forbidden: dht.records imports protocols.gossip  [dht must not import protocols]",
        "forbidden: nat.autonat imports dht.records  [nat must not import dht]",
        "forbidden: runtime.errors imports wire.signed  [runtime must not import wire]",
        "forbidden: wire.rpc imports nat.addresses  [wire must not import nat]",
    ]


def test_the_command_exits_1_and_lists_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The notes come from a small tree with a TYPE_CHECKING-only cycle (the repository's own graph is
    # the test above's: parsing it again for each main() cost ~1 s of CPU apiece).
    _write(
        tmp_path,
        {
            "nat/__init__.py": "",
            "nat/relay.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import upnp\n",
            "nat/upnp.py": "from nat import relay\n",
        },
    )
    small = import_graph.build(tmp_path)
    monkeypatch.setattr(import_graph, "build", lambda root=None: small)
    monkeypatch.setattr(import_graph, "check", lambda: (["forbidden: a imports b"], ["old entry"]))
    assert import_graph.main() == 1
    out = capsys.readouterr().out
    assert "forbidden: a imports b" in out and "stale allowed entry (fixed? remove it from ALLOWED): old entry" in out
    assert "note: cycle closed only by TYPE_CHECKING imports (allowed): nat.relay -> nat.upnp -> nat.relay" in out
    monkeypatch.setattr(import_graph, "check", lambda: ([], []))
    assert import_graph.main() == 0
