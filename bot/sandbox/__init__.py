"""The sandbox: stand-ins for what cannot run on a laptop or in CI, served over real HTTP so that the
real clients talk to them — a Kubernetes API emulator (checked against the real kubectl), a Slack
Web API emulator that also serves the browser playground, and private PostgreSQL/Redis servers.

Used by the tests and by `opsbot dev`. Nothing in the request path imports this package: the bot
does not know it is in a sandbox (an import-linter contract keeps it so).
"""
