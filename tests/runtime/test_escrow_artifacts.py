"""The committed ABIs and bytecodes are what the committed Vyper sources compile to."""

from __future__ import annotations

import pytest

from runtime.escrow import artifacts


@pytest.mark.parametrize("name", artifacts.CONTRACTS)
def test_committed_artifact_equals_a_fresh_compile(name: str) -> None:
    fresh = artifacts.compile_source(name)
    committed = artifacts.load(name)
    assert committed.source_sha256 == fresh.source_sha256, (
        f"{name}.vy changed: rebuild with `python -m runtime.escrow.artifacts` and commit {name}.json"
    )
    assert committed.abi == fresh.abi
    assert committed.bytecode == fresh.bytecode
    assert (artifacts.HERE / f"{name}.json").read_text() == artifacts.render(fresh)
