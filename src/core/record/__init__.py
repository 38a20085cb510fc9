"""What a run leaves on disk and where it came from: the run directory and its YAML files,
atomic checkpoints, the git gate and commit, the environment and the data fingerprint,
and the initial weights a run may start from."""
