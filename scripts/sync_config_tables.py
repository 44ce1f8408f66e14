"""Rewrite pyproject's [tool.flwr.app.config] and README's config table from the schema.

Flower only accepts run-config keys listed in pyproject.toml, and the README documents every key:
both are generated from ``fedmae_flwr.config.FedMAEConfig`` (tests/test_config.py checks them).
Run: ``.venv/bin/python scripts/sync_config_tables.py``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from fedmae_flwr.config import FedMAEConfig, default_run_config, to_kebab

ROOT = Path(__file__).resolve().parent.parent


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def pyproject_table() -> str:
    return "\n".join(f"{k} = {toml_value(v)}" for k, v in default_run_config().items())


def readme_table() -> str:
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    defaults = default_run_config()
    for f in dataclasses.fields(FedMAEConfig):
        key = to_kebab(f.name)
        allowed = " \\| ".join(f.metadata.get("choices") or ())
        default = toml_value(defaults[key])
        rows.append(f"| `{key}` | `{default}` | {allowed} | {f.metadata['help']} |")
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
        r"\| key \| default \| allowed \| meaning \|\n(\|.*\|\n)+",
        lambda m: readme_table() + "\n",
        text,
    )
    readme.write_text(text)


if __name__ == "__main__":
    main()
