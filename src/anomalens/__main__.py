"""`python -m anomalens ...`: the same command line as `anomalens ...`."""

from anomalens.cli import app

app(prog_name="anomalens")
