"""README.md's reference tables stay true: every config key with its default, every CLI command and option.

The manual is what users configure and type from; a key, default or option added to the code and not to
the README (or left in the README after it is gone) fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from node.cli import main as cli
from node.config import Config, _sections, _toml_value

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
# Options every daemon-facing command takes; the CLI reference leaves them out of some rows.
COMMON_OPTIONS = {"--data-dir", "--json", "--help"}


def _config_rows() -> dict[str, str]:
    sections = "|".join(_sections())
    pattern = rf"^\| `((?:{sections})\.[a-z_]+)` \| `([^`]*)` \|"
    return {key: default for key, default in re.findall(pattern, README, re.MULTILINE)}


def test_every_config_key_is_in_the_readme_with_its_default() -> None:
    rows = _config_rows()
    defaults = Config()
    expected = {
        f"{section}.{key}": _toml_value(getattr(getattr(defaults, section), key))
        for section, model in _sections().items()
        for key in model.model_fields
    }
    missing = sorted(set(expected) - set(rows))
    unknown = sorted(set(rows) - set(expected))
    wrong = {key: (rows[key], value) for key, value in expected.items() if key in rows and rows[key] != value}
    assert not missing, f"config keys missing from README's table: {missing}"
    assert not unknown, f"README lists config keys that do not exist: {unknown}"
    assert not wrong, f"README defaults (README, code) that differ: {wrong}"


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found: list[tuple[tuple[str, ...], click.Command]] = []
    for name, command in group.commands.items():
        found.append(((*path, name), command))
        if isinstance(command, click.Group):
            found += _commands(command, (*path, name))
    return found


def test_every_cli_command_and_option_is_in_the_readme() -> None:
    rows = [line for line in README.splitlines() if line.startswith("| `clawnode ")]
    problems = []
    for path, command in _commands(cli):
        usage = "`clawnode " + " ".join(path)
        row = next((r for r in rows if r.startswith("| " + usage + " ") or r.startswith("| " + usage + "`")), None)
        if row is None:
            problems.append(f"no row for clawnode {' '.join(path)}")
            continue
        cell = row.split(" | ")[0]
        for param in command.params:
            if isinstance(param, click.Option):
                for option in (*param.opts, *param.secondary_opts):
                    if option.startswith("--") and option not in COMMON_OPTIONS and option not in cell:
                        problems.append(f"clawnode {' '.join(path)}: {option} not in its row")
    assert not problems, "\n".join(problems)
