"""The `aetheris` command line: train, generate, serve, analyze-router."""
