"""The `aetheris` command line (main.py). `aetheris ...`, `python -m aetheris.cli ...` and the original
project's `python -m aetheris.cli.main ...` all run `main.main`."""
