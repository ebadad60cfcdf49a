"""CLI command modules (installed as granite_cli.commands). Thin adapters over the core."""
