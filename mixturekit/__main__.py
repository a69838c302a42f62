"""`python -m mixturekit`: the same commands as the `mixturekit` script."""

from .cli import app

app(prog_name="mixturekit")
