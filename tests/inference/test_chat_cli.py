"""`clawnode chat` and /v1 against a real daemon serving a tiny llama.cpp model from its config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from node.datadir import read_api_token, read_running
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.processes import CLAWNODE, LOOPBACK_ANY_PORT, DaemonProcess, run_cli


def _daemon(tmp_path: Path) -> DaemonProcess:
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    data_dir = tmp_path / "node"
    data_dir.mkdir(mode=0o700)
    (data_dir / "config.toml").write_text(
        f'[escrow]\nmode = "off"\n[bootstrap]\nuse_defaults = false\n'
        f'[[models]]\nname = "tiny"\npath = "{model}"\nprice_per_unit = 1000\nn_threads = 1\n'
    )
    return DaemonProcess(data_dir, list(LOOPBACK_ANY_PORT))


def test_chat_streams_an_answer_and_says_who_served_it(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    daemon = _daemon(tmp_path).start()
    daemons.append(daemon)
    assert "model tiny" in daemon.log()  # the load progress lines
    result = run_cli("chat", "tiny", "hello there", "--max-tokens", "8", "--data-dir", str(daemon.data_dir))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.rstrip("\n")) == 8  # one character per token for the tiny model
    assert "[served by local]" in result.stderr

    # A conversation on stdin: two questions, two answers.
    conversation = subprocess.run(
        [*CLAWNODE, "chat", "tiny", "--max-tokens", "4", "--data-dir", str(daemon.data_dir)],
        input="first question\nsecond question\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert conversation.returncode == 0, conversation.stderr
    assert conversation.stderr.count("[served by local]") == 2

    unknown = run_cli("chat", "no-such-model", "hi", "--data-dir", str(daemon.data_dir))
    assert unknown.returncode == 1 and "E_NOT_FOUND" in unknown.stderr

    running = read_running(daemon.data_dir)
    assert running is not None
    headers = {"authorization": f"Bearer {read_api_token(daemon.data_dir)}"}
    models = httpx.get(f"{running.api_url}/v1/models", headers=headers, timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    capabilities = httpx.get(f"{running.api_url}/api/capabilities", headers=headers, timeout=10).json()
    assert [offer["name"] for offer in capabilities["offers"]] == ["model:tiny"]
    assert str(tmp_path) not in result.stdout + result.stderr + daemon.log()
