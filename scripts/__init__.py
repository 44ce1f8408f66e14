"""Command-line tools of the repo (run them with the venv python from the repo root)."""
