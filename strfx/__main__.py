"""``python -m strfx`` is the ``strfx`` command."""

from strfx.cli import main

main()
