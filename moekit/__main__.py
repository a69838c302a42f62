"""`python -m moekit`: the same commands as the `moekit` script."""

from .cli import app

app(prog_name="moekit")
