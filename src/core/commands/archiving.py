"""`--archive RUN_DIR [URI]` and `--restore URI` (the archive itself: src/core/archive/)."""

from pathlib import Path

from src.core.archive.commands import archive_run
from src.core.archive.restore import print_restore_report, restore_run
from src.core.commands.cli import CommandLine
from src.core.config.uris import is_archive_uri
from src.core.errors import UserError
from src.core.record.rundir import log_root


def run_archive_command(command: CommandLine) -> int | None:
    """--archive and --restore; None when neither was asked for."""
    if command.archive:
        if len(command.archive) > 2:
            raise UserError(f"--archive takes RUN_DIR [URI], got {len(command.archive)} values")
        report = archive_run(Path(command.archive[0]), *command.archive[1:], command.delete_local_checkpoints)
        print(
            f"archived {command.archive[0]}: {len(report.uploaded)} checkpoint(s) uploaded and verified, "
            f"{len(report.skipped)} already archived"
        )
        return 0
    if command.delete_local_checkpoints:
        raise UserError("--delete-local-checkpoints goes with --archive RUN_DIR [URI]")
    if command.restore:
        if not is_archive_uri(command.restore):
            raise UserError(
                f"--restore {command.restore}: expected an archive URI such as s3://bucket/prefix/project/run"
            )
        print_restore_report(restore_run(command.restore, log_root(command.log_dir)))
        return 0
    return None
