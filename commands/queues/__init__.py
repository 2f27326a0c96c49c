"""Commands on the platforms' BullMQ queues, as bull-board shows and does them: stats, failed jobs,
retry one or a bounded batch, pause/resume, clean old finished jobs. Queues are the config's
``queues:`` entries; the Redis calls are bot/adapters/queues.py's."""
