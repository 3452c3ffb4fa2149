"""Shim: `python cli.py ...` is `tracegen ...`."""

from tracegen.cli import main

if __name__ == "__main__":
    main()
