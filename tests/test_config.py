"""Configuration: file, environment and flags, and bad values that stop the daemon."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from node.config import OFFERS_MARKER, Config, ConfigError, default_config_text, load_config
from tests.support.processes import run_cli


def test_first_start_writes_commented_defaults_that_parse_to_the_defaults(tmp_path: Path) -> None:
    text = default_config_text().split(OFFERS_MARKER)[0]
    uncommented = "\n".join(line[2:] if line.startswith("# ") and " = " in line else line for line in text.splitlines())
    parsed = tomllib.loads(uncommented)
    assert Config.model_validate(parsed) == Config()
    sections = {"node", "api", "bootstrap", "dht", "capabilities", "hardware", "escrow", "market", "router", "log"}
    sections.add("alerts")
    sections.add("nat")
    sections.add("relay")
    sections.add("sandbox")
    sections.add("verify")
    sections.add("split")
    assert tomllib.loads(default_config_text()) == {section: {} for section in sections}


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[api]\nport = 9000\n[node]\nrole = "relay"\n')
    from_file = load_config(tmp_path, environ={})
    assert (from_file.api.port, from_file.node.role) == (9000, "relay")
    from_env = load_config(
        tmp_path,
        environ={"CLAWNODE_API_PORT": "9001", "CLAWNODE_NODE_LISTEN": "/ip4/127.0.0.1/tcp/0, /ip4/127.0.0.1/tcp/5"},
    )
    assert from_env.api.port == 9001
    assert from_env.node.listen == ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/5"]
    from_flag = load_config(tmp_path, {("api", "port"): "9002"}, environ={"CLAWNODE_API_PORT": "9001"})
    assert from_flag.api.port == 9002


@pytest.mark.parametrize(
    ("file_text", "environ", "names"),
    [
        ('[node]\nrole = "boss"\n', {}, ["node.role", "config.toml", "node | bootstrap | relay"]),
        ("", {"CLAWNODE_API_PORT": "seventy"}, ["api.port", "CLAWNODE_API_PORT"]),
        ("[api]\nport = 70000\n", {}, ["api.port", "65535"]),
        ('[bootstrap]\npeers = ["/ip4/1.2.3.4/tcp/1"]\n', {}, ["bootstrap.peers", "/p2p/"]),
        ('[node]\nlisten = ["not-an-addr"]\n', {}, ["node.listen", "not a multiaddr"]),
        ("[api]\nprot = 1\n", {}, ["api.prot", "unknown key", "api.port"]),
        ('[log]\nlevel = "loud"\n', {}, ["log.level", "debug | info | warning | error"]),
        ("[node\n", {}, ["config.toml is not valid TOML"]),
    ],
)
def test_bad_values_name_the_key_the_source_and_what_is_allowed(
    tmp_path: Path, file_text: str, environ: dict[str, str], names: list[str]
) -> None:
    (tmp_path / "config.toml").write_text(file_text)
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path, environ=environ)
    for name in names:
        assert name in str(raised.value)


def test_clawnode_start_with_a_bad_value_exits_2_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[node]\nrole = "boss"\n')
    result = run_cli("start", "--data-dir", str(tmp_path), timeout=60)
    assert result.returncode == 2
    assert "node.role" in result.stderr and "bootstrap" in result.stderr

    result = run_cli("start", "--data-dir", str(tmp_path / "other"), "--api-port", "-5", timeout=60)
    assert result.returncode == 2
    assert "api.port" in result.stderr and "command-line flag" in result.stderr
    assert str(tmp_path) not in result.stderr


def test_commands_without_a_running_daemon_say_so(tmp_path: Path) -> None:
    for command in ("status", "peers", "id"):
        result = run_cli(command, "--data-dir", str(tmp_path))
        assert result.returncode == 3
        assert "E_UNAVAILABLE" in result.stderr


def test_the_commented_offer_example_is_a_valid_offer(tmp_path: Path) -> None:
    example = default_config_text().split(OFFERS_MARKER)[1]
    lines = [line[2:].split("  #")[0] for line in example.splitlines() if line.startswith("# ") and "=" in line]
    (tmp_path / "config.toml").write_text("[[offers]]\n" + "\n".join(lines) + "\n")
    config = load_config(tmp_path, environ={})
    assert [offer.name for offer in config.offers] == ["model:gemma3-270m-q4_k_m"]
    descriptor = config.offers[0].descriptor()
    assert descriptor.model is not None and descriptor.model.context_length == 8192


def test_a_bad_offer_names_its_key(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[[offers]]\nname = "model:x"\nprice_per_unit = -1\n')
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path, environ={})
    assert "offers.0.price_per_unit" in str(raised.value)
    (tmp_path / "config.toml").write_text('[[offers]]\nname = "Model X"\nprice_per_unit = 1\n')
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path, environ={})
    assert "offers.0.name" in str(raised.value) and "kind:name" in str(raised.value)


def test_trusted_arbiters_are_peer_and_wallet_pairs_and_a_wallet_alone_stops_the_daemon(tmp_path: Path) -> None:
    peer, wallet = "12D3KooW" + "A" * 44, "0x" + "ab" * 20
    (tmp_path / "config.toml").write_text(f'[escrow]\ntrusted_arbiters = ["{peer}:{wallet}"]\n')
    assert load_config(tmp_path, environ={}).escrow.trusted_arbiter_pairs() == ((peer, wallet),)
    other, env = "12D3KooW" + "B" * 44, "CLAWNODE_ESCROW_TRUSTED_ARBITERS"
    from_env = load_config(tmp_path, environ={env: f"{peer}:{wallet},{other}:{wallet}"})
    assert from_env.escrow.trusted_arbiter_pairs() == ((peer, wallet), (other, wallet))
    # What the key took before, a wallet alone, is refused with what to write instead: a panel could seat that
    # wallet under a peer id of the task's creator, and the arbiter would never get the case.
    for source, file_text, environ in (
        ("config.toml", f'[escrow]\ntrusted_arbiters = ["{wallet}"]\n', {}),
        (env, "", {env: wallet}),
    ):
        (tmp_path / "config.toml").write_text(file_text)
        with pytest.raises(ConfigError) as raised:
            load_config(tmp_path, environ=environ)
        for name in ("escrow.trusted_arbiters", source, "PEER:WALLET", "a wallet alone"):
            assert name in str(raised.value)
    (tmp_path / "config.toml").write_text(f'[escrow]\ntrusted_arbiters = ["{peer}@{wallet}"]\n')
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path, environ={})
    assert "PEER:WALLET" in str(raised.value)
