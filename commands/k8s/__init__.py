"""Commands on Kubernetes workloads: deployments (status, scale, rollback, restart, history, pods,
events, logs), their HorizontalPodAutoscalers (hpa) and CronJobs (backup)."""
