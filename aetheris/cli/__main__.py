"""`python -m aetheris.cli` (also what torchrun runs for distributed training)."""

from .main import main

main()
