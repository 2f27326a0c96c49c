from bot.policy.engine import decide

__all__ = ["decide"]
