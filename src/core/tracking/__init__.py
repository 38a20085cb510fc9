"""Where logged values go: metrics.jsonl (what resume, --reproduce and --runs read),
TensorBoard, and the optional experiment trackers (W&B, MLflow)."""
