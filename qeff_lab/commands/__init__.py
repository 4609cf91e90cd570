"""CLI commands beyond the core ones in qeff_lab/cli.py; each module has register(subparsers)."""
