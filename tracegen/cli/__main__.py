"""``python -m tracegen.cli`` == ``tracegen``."""

from tracegen.cli.app import main

main()
