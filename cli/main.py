"""The `rpiae` command line: thin commands over the library API."""

from __future__ import annotations

import click

from rpiae import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rpiae")
def main() -> None:
    """Train, export and serve the RPiAE image tokenizer."""


if __name__ == "__main__":
    main()
