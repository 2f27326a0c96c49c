"""`/ops health`: the platforms' HTTP health endpoints (`/healthz`, `/readyz`, `/v1/health`, a line
of `/metrics`), as configured under ``health:``. (``commands.http`` is this package, not the
standard library's ``http``; commands reach the network only through ``bot.ports.HttpProbes``.)"""
