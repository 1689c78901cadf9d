"""``python -m genrerank`` = the ``genrerank`` command."""

from genrerank.cli import main

main(prog_name="genrerank")
