"""Runs that outlive the machine: mirror a run directory to object storage, restore it, list it.

An archive is a URI (`s3://bucket/prefix`, `gs://bucket/prefix`, `file:///mnt/shared/runs`)
read and written through fsspec; s3fs and gcsfs are the S3 and GCS back ends
(`pip install -r requirements-archive.txt`). A run `logs/<project>/<run>/` goes to
`<archive>/<project>/<run>/`, laid out as on disk:

    config.yaml packages.txt metadata.yaml metrics.jsonl events.out.tfevents.* figures/ evaluation/
    checkpoints/step-<N>.pt      uploaded first; its SHA-256 is computed while it is sent
    checkpoints/step-<N>.json    its manifest, uploaded only after the .pt is verified
    checkpoints/last.json, best.json   pointers ("links_to": the step file); no last.pt/best.pt
                                       objects: a restore makes them hard links again

A step file without its manifest in the archive is not a checkpoint (an upload that was
interrupted), and a restore skips it. metrics.jsonl is uploaded before a checkpoint's
manifest, so an archived checkpoint never covers more logged lines than the archive holds.
Credentials come from the usual places (the environment, ~/.aws, an instance role,
GOOGLE_APPLICATION_CREDENTIALS); a URI holding credentials is refused, so none reach
config.yaml, metadata.yaml or the command line. S3-compatible stores (and the tests'
local server) are reached through the standard AWS_ENDPOINT_URL variable, a GCS emulator
(the tests' too) through STORAGE_EMULATOR_HOST, without credentials.

Integration (the Trainer and run.py):

    uri = check_archive(config)           # at plan time, before the run directory: exit 2 on bad input
    mirror = Mirror(run_directory, uri, interval=config.archive.sync_interval_seconds)
                                          # rank 0, when uri is not None; starts the worker thread
    CheckpointWriter(..., archive=mirror) # calls mirror.checkpoint_durable(path) after the manifest
                                          # and mirror.checkpoints_pruned(names) after pruning
    mirror.sync_run_files()               # whenever run files changed (any time; coalesced)
    ok = mirror.close(config.archive.final_sync_timeout_seconds)   # after the final metadata update

    archive_run(run_directory, uri)       # --archive (commands.py)
    restore_run(uri, log_root)            # --restore, --resume URI (restore.py)
    archived_runs(uri)                    # --runs URI (restore.py; src/core/commands/runs.py makes the table)

Nothing the mirror does blocks training: it works on its own thread, retries with
backoff, warns once, and records `archive: {uri, status, last_synced_step}` in
metadata.yaml (status: synced, behind, or failed when the store refuses).
"""
