"""The contracts' committed builds: ABI, bytecode and runtime bytecode in ``<Name>.json`` beside ``<Name>.vy``.

``Escrow`` is the lease escrow; ``MockERC20`` a stand-in stablecoin for development chains and tests.
The daemon loads the committed JSON (no compiler at run time); ``python -m runtime.escrow.artifacts``
rewrites them from the sources, and ``tests/runtime/test_escrow_artifacts.py`` fails when they differ.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

HERE = Path(__file__).parent
SOURCE_PATH = HERE / "Escrow.vy"
ARTIFACT_PATH = HERE / "Escrow.json"
VYPER_VERSION = "0.4.3"
CONTRACTS = ("Escrow", "MockERC20")


class Artifact(BaseModel):
    model_config = ConfigDict(frozen=True)

    contract: str
    vyper_version: str
    source_sha256: str
    abi: list[dict[str, Any]]
    bytecode: str
    bytecode_runtime: str

    @property
    def runtime_code_hash(self) -> bytes:
        """keccak256 of the code a deployed escrow holds (Escrow.vy has no immutables: it is exact)."""
        from eth_utils import keccak

        return bytes(keccak(hexstr=self.bytecode_runtime))


def compile_source(name: str = "Escrow") -> Artifact:
    """Compile ``<name>.vy`` in-process with the pinned vyper (0.5–4 s)."""
    import vyper  # imported here: only the build and its check need the compiler
    from vyper.compiler import compile_code

    if vyper.__version__ != VYPER_VERSION:
        raise RuntimeError(f"vyper {VYPER_VERSION} is required to build the escrow, found {vyper.__version__}")
    source = (HERE / f"{name}.vy").read_text()
    out = compile_code(source, output_formats=["abi", "bytecode", "bytecode_runtime"])
    return Artifact(
        contract=name,
        vyper_version=VYPER_VERSION,
        source_sha256=hashlib.sha256(source.encode()).hexdigest(),
        abi=out["abi"],
        bytecode=out["bytecode"],
        bytecode_runtime=out["bytecode_runtime"],
    )


def render(artifact: Artifact) -> str:
    return json.dumps(artifact.model_dump(), indent=1, sort_keys=True) + "\n"


@cache
def load(name: str = "Escrow") -> Artifact:
    """The committed artifact of ``name`` (one of :data:`CONTRACTS`)."""
    if name not in CONTRACTS:
        raise ValueError(f"no such contract: {name}")
    return Artifact.model_validate_json((HERE / f"{name}.json").read_text())


if __name__ == "__main__":
    for contract in CONTRACTS:
        (HERE / f"{contract}.json").write_text(render(compile_source(contract)))
        print(f"wrote {contract}.json")
