"""The ``gpual`` command line (Typer); thin: parse, call the library, print."""
