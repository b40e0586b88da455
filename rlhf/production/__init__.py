"""What runs around the loop: metrics and plots, Ray/Prometheus monitoring, checkpoints, lineage,
W&B artifacts and the stall watchdog. Nothing here imports a role."""
