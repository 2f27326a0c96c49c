"""One module per command. A command parses its arguments, plans (a read-only look at the target)
and executes the plan through the ports in ``bot.ports``. ``registry`` maps what people type to them."""
