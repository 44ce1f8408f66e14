"""Rewrite pyproject's [tool.flwr.app.config] and README's config table from the schema.

Flower only accepts run-config keys listed in pyproject.toml, so the table lists every key of
``fedmae_flwr.config``, each as ``""`` ("not set": the defaults live in the schema only); the
README documents every key with its section and default. tests/test_config.py checks both.
Run: ``.venv/bin/python scripts/sync_config_tables.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from fedmae_flwr.config import KEYS, UNSET, default_run_config

ROOT = Path(__file__).resolve().parent.parent


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def pyproject_table() -> str:
    return "\n".join(f"{name} = {toml_value(UNSET)}" for name in KEYS)


def readme_table() -> str:
    rows = ["| key | section | default | allowed | meaning |", "|---|---|---|---|---|"]
    defaults = default_run_config()
    for name, key in KEYS.items():
        allowed = " \\| ".join(key.choices)
        default = toml_value(defaults[name])
        section = f"`{key.section}`" if key.section else "(top)"
        rows.append(f"| `{name}` | {section} | `{default}` | {allowed} | {key.help} |")
    return "\n".join(rows)


def synced() -> dict[Path, str]:
    """pyproject.toml and README.md as they should read, by path.

    Raises:
        ValueError: a file lacks its table (``--check`` would compare nothing).
    """
    pyproject, readme = ROOT / "pyproject.toml", ROOT / "README.md"
    tables = {
        pyproject: (
            r"(\[tool\.flwr\.app\.config\]\n)(.*?)(\n\n\[)",
            lambda m: m.group(1) + pyproject_table() + m.group(3),
            re.S,
        ),
        readme: (
            r"\| key \|( section \|)? default \| allowed \| meaning \|\n(\|.*\|\n)+",
            lambda m: readme_table() + "\n",
            0,
        ),
    }
    out = {}
    for path, (pattern, table, flags) in tables.items():
        out[path], found = re.subn(pattern, table, path.read_text(), flags=flags)
        if found != 1:
            raise ValueError(f"{path.name}: expected its config table once, found {found}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 naming the files out of date"
    )
    args = parser.parse_args(argv)
    stale = [path for path, text in synced().items() if path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.name} is out of date: run {Path(__file__).name} without --check")
        return 1 if stale else 0
    for path, text in synced().items():
        if path in stale:
            path.write_text(text)
            print(f"rewrote {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
