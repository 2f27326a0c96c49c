"""Commands on a platform's own data: its database rows and BullMQ queues (webhook replay, provider switches)."""
