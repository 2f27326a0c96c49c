"""Commands made from the config's `actions:` (bot/action_config.py), one module per kind."""
