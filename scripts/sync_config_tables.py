"""Rewrite pyproject's [tool.flwr.app.config] and README's config table from the schema.

Flower only accepts run-config keys listed in pyproject.toml, so the table lists every key of
``fedmae_flwr.config``, each as ``""`` ("not set": the defaults live in the schema only); the
README documents every key with its section and default. tests/test_config.py checks both.
Run: ``.venv/bin/python scripts/sync_config_tables.py``.
"""

from __future__ import annotations

import json
import re
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


def main() -> None:
    pyproject = ROOT / "pyproject.toml"
    text = pyproject.read_text()
    text = re.sub(
        r"(\[tool\.flwr\.app\.config\]\n)(.*?)(\n\n\[)",
        lambda m: m.group(1) + pyproject_table() + m.group(3),
        text,
        flags=re.S,
    )
    pyproject.write_text(text)
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = re.sub(
        r"\| key \|( section \|)? default \| allowed \| meaning \|\n(\|.*\|\n)+",
        lambda m: readme_table() + "\n",
        text,
    )
    readme.write_text(text)


if __name__ == "__main__":
    main()
