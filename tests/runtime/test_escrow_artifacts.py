"""The committed ABI and bytecode are what the committed Vyper source compiles to."""

from __future__ import annotations

from runtime.escrow import artifacts


def test_committed_artifact_equals_a_fresh_compile() -> None:
    fresh = artifacts.compile_source()
    committed = artifacts.load()
    assert committed.source_sha256 == fresh.source_sha256, (
        "Escrow.vy changed: rebuild with `python -m runtime.escrow.artifacts` and commit Escrow.json"
    )
    assert committed.abi == fresh.abi
    assert committed.bytecode == fresh.bytecode
    assert artifacts.ARTIFACT_PATH.read_text() == artifacts.render(fresh)
