"""`bootstrap_model_file`: a new run's initial weights, found, fingerprinted and loaded safely.

The file lives outside git (often in another run's checkpoints/), so, like the data, it is
fingerprinted: its absolute path and SHA-256 go into the run's config.yaml (`bootstrap`).
`--resume` and `--reproduce` refuse to continue from a file that changed since, and
`--reproduce`, whose worktree has no logs/, reads it at its recorded absolute path.
"""

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from src.core.config.validation import Config
from src.core.errors import UserError
from src.core.record.checkpoint import DamagedCheckpoint, load_refusal, manifest_path, read_checkpoint
from src.core.record.git import PROJECT_ROOT

KEY = "bootstrap_model_file"


def bootstrap_path(value: str) -> Path:
    """The file a config names: relative paths start at the project root, as `data_directory`'s do."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _require_file(path: Path, where: str) -> None:
    try:
        is_file = path.is_file()
    except OSError:  # a symlink loop, a name too long
        is_file = False
    if not is_file:
        raise UserError(
            f"{where}: {str(path)!r} is not a file; expected a checkpoint of this template or a saved state dict "
            "(relative paths start at the project root)"
        )


def bootstrap_record(config: Config) -> dict | None:
    """The provenance entry of a new run's initial weights, `{path, sha256}`; None without them."""
    if not config.bootstrap_model_file:
        return None
    path = bootstrap_path(config.bootstrap_model_file)
    _require_file(path, f"config key {KEY!r}")
    path = path.resolve()
    return {"path": str(path), "sha256": _readable_sha256(path, f"config key {KEY!r}")}


def _readable_sha256(path: Path, where: str) -> str:
    """`file_sha256`, with a file that cannot be read (permissions, /proc/self/mem) as one UserError."""
    try:
        return file_sha256(path)
    except OSError as error:
        raise UserError(
            f"{where}: {str(path)!r} cannot be read ({error.strerror or type(error).__name__}); expected a "
            "readable checkpoint of this template or a saved state dict"
        ) from None


def check_bootstrap(recorded: dict | None, flag: str, run_directory: Path) -> Path | None:
    """The recorded initial weights, checked unchanged since the run started (exit 2 if not);
    their absolute path, or None for a run without them (or from before they were recorded)."""
    if not recorded:
        return None
    path = Path(recorded["path"])
    _require_file(path, f"{flag} {run_directory}: the run's {KEY}")
    if _readable_sha256(path, f"{flag} {run_directory}: the run's {KEY}") != recorded["sha256"]:
        raise UserError(
            f"{flag} {run_directory}: the run started from the weights in {path} (bootstrap_model_file), but that "
            f"file changed since (its SHA-256 is no longer {recorded['sha256'][:12]}...), so the run could not be "
            "re-made as it began. Restore the file, or start a new run."
        )
    return path


def _is_state_dict(value: object) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _select(whole: object, key: str | None, path: Path) -> Mapping:
    """The state dict inside a loaded file: under `bootstrap_model_key` (dotted for nesting), else the
    template's `model` entry, else the file itself."""
    if key is None:
        state = whole.get("model", whole) if isinstance(whole, Mapping) else whole
    else:
        state = whole
        for part in key.split("."):
            if not (isinstance(state, Mapping) and part in state):
                found = ", ".join(map(repr, list(state)[:20])) if isinstance(state, Mapping) else type(state).__name__
                raise UserError(
                    f"config key 'bootstrap_model_key': {path} has no entry {part!r} (of {key!r}); found: {found}"
                )
            state = state[part]
    if not _is_state_dict(state):
        found = ", ".join(map(repr, list(state)[:20])) if isinstance(state, Mapping) else type(state).__name__
        raise UserError(
            f"config key {KEY!r}: {path} holds no state dict (a mapping of parameter names to tensors) "
            f"{'under ' + repr(key) if key else 'at its top level or under model'}; found: {found}. "
            "Name the entry that holds it with bootstrap_model_key (e.g. state_dict)"
        )
    return state


def _strip_prefix(state: Mapping, prefix: str | None, path: Path) -> dict:
    """`module.linear.weight` -> `linear.weight` (DDP's wrapper) for `bootstrap_model_prefix: module.`."""
    if not prefix:
        return dict(state)
    if not any(name.startswith(prefix) for name in state):
        raise UserError(
            f"config key 'bootstrap_model_prefix': no parameter name in {path} starts with {prefix!r} "
            f"(e.g. {next(iter(state))!r}); leave it out, or give the prefix they have"
        )
    return {name.removeprefix(prefix): value for name, value in state.items()}


def load_bootstrap_weights(config: Config) -> dict:
    """The state dict `bootstrap_model_file` holds (loaded with weights_only=True): a checkpoint of
    this template (verified against its manifest), or any file torch.save wrote, with the state
    dict under `bootstrap_model_key` and `bootstrap_model_prefix` stripped from its names."""
    path = bootstrap_path(config.bootstrap_model_file)
    _require_file(path, f"config key {KEY!r}")
    if manifest_path(path).exists():
        try:
            whole = read_checkpoint(path)
        except DamagedCheckpoint as error:
            raise UserError(f"config key {KEY!r}: {error}") from None
    else:
        try:
            whole = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # an unsafe pickle lands here, unexecuted
            reason = load_refusal(error)
            message = f"config key {KEY!r}: {path} cannot be loaded safely (weights_only=True): {reason}"
            raise UserError(message) from None
    return _strip_prefix(_select(whole, config.bootstrap_model_key, path), config.bootstrap_model_prefix, path)


def bootstrap_model(model: torch.nn.Module, config: Config) -> None:
    """Load the initial weights into `model`; names that do not fit are a config error naming them."""
    state = load_bootstrap_weights(config)
    missing, unexpected = sorted(model.state_dict().keys() - state.keys()), sorted(state.keys() - model.state_dict())
    if missing or unexpected:
        shown = "; ".join(
            f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for what, names in (("missing", missing), ("unexpected", unexpected))
            if names
        )
        raise UserError(
            f"config key {KEY!r}: the weights in {config.bootstrap_model_file} do not fit {type(model).__name__} "
            f"({shown}); is it another model, or do its names need bootstrap_model_prefix (e.g. 'module.')?"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # shapes
        detail = " ".join(str(error).split())[:400]
        raise UserError(f"config key {KEY!r}: the weights do not fit {type(model).__name__}: {detail}") from None
