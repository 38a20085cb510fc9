"""The template's own config keys, as cerberus rules. Your keys go in `src/schema.py`.

`meta: {affects_results: false}` marks keys that `--resume` may change, because
they do not change what the run computes (how long it runs, how it reports).

Numbers have ranges the machinery can use: a count above 2**31 - 1 or a NaN learning
rate would pass a plain type check and fail deep inside torch, or train to NaN silently.
"""

import math
import re

from src.core.config.uris import check_uri
from src.core.errors import UserError

NEUTRAL = {"affects_results": False}
# What a #SBATCH line may hold: one value, or one option, without spaces or line breaks (a line
# break would end the directive, and what follows would run as the script).
SBATCH_VALUE = r"[^\s]+"
SBATCH_OPTION = r"--?[A-Za-z][^\s]*"
MAX_COUNT = 2**31 - 1  # steps, epochs, batch sizes: what torch's int32 sizes and samplers take
MAX_SEED = 2**63 - 1  # torch.manual_seed takes -2**63 .. 2**64 - 1; an int64 holds this range
MAX_SECONDS = 365 * 24 * 3600.0  # timeouts: a year (datetime.timedelta overflows near 10**14 s)
MAX_NAME_BYTES = 255  # a directory name on every common filesystem
# What sbatch --time accepts: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit.
SLURM_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|INFINITE|UNLIMITED")


def finite(field, value, error) -> None:
    """cerberus `check_with`: NaN and infinity pass `min`/`max` (every comparison with NaN is
    False), so a number that must be usable is checked here."""
    if isinstance(value, float) and not math.isfinite(value):
        error(field, "must be a finite number (not NaN or infinity)")


def positive(field, value, error) -> None:
    """cerberus `check_with`: finite and strictly above 0."""
    finite(field, value, error)
    if isinstance(value, int | float) and math.isfinite(value) and value <= 0:
        error(field, "must be above 0")


def slurm_time(field, value, error) -> None:
    if isinstance(value, str) and not SLURM_TIME.fullmatch(value):
        error(field, "must be a Slurm time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")


def name_length(field, value, error) -> None:
    size = len(value.encode()) if isinstance(value, str) else 0
    if size > MAX_NAME_BYTES:
        error(field, f"must be at most {MAX_NAME_BYTES} bytes (it names a directory; this one has {size})")


def to_float(value):
    """Let `lr: 1` mean 1.0, without turning strings or booleans into numbers."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _float(**rule) -> dict:
    return {"type": "float", "coerce": to_float, "check_with": finite, **rule}


def _count(minimum: int = 1, **rule) -> dict:
    return {"type": "integer", "min": minimum, "max": MAX_COUNT, **rule}


def _section(schema: dict, **rule) -> dict:
    return {"type": "dict", "default": {}, "schema": schema, **rule}


def _keeps_jsonl(field, value, error) -> None:
    """Trackers come beside metrics.jsonl, never instead of it: resume and --reproduce need it."""
    if isinstance(value, list) and "jsonl" not in value:
        error(
            field,
            "needs 'jsonl' (metrics.jsonl is what --resume, --reproduce and --runs read); "
            "e.g. [tensorboard, jsonl, wandb]",
        )


NAME = {
    "type": "string",
    "regex": r"[A-Za-z0-9][A-Za-z0-9._=,+-]*",
    "check_with": name_length,
    "nullable": True,
    "default": None,
}


def _archive_uri(field, value, error):
    """Refuse a URI holding credentials (they would be saved with the run) or of an unknown scheme."""
    if value:
        try:
            check_uri(value)
        except UserError as problem:
            error(field, str(problem))


FREE_DICT = {"type": "dict", "default": {}}

TEMPLATE_SCHEMA = {
    # What the run is (free text, shown by `--runs`) and where it is logged.
    "description": {"type": "string", "required": True, "empty": False, "meta": NEUTRAL},
    "project_name": {**NAME, "meta": NEUTRAL},  # logs/<project_name or model_type>/...
    "run_name": {**NAME, "meta": NEUTRAL},  # .../<run_name or a timestamp>/
    # --snapshot refuses untracked files larger than this (MB): data and checkpoints belong in .gitignore.
    "snapshot_max_file_mb": _float(min=0.0, default=10.0, meta=NEUTRAL),
    # The model, the loss and the data: names resolved in src/model.py and src/data_loader.py.
    "data_directory": {"type": "string", "required": True, "empty": False},
    "model_type": {"type": "string", "required": True},
    "model_parameters": FREE_DICT,  # keyword arguments of the model class
    "bootstrap_model_file": {"type": "string", "nullable": True, "default": None},
    "bootstrap_model_key": {"type": "string", "nullable": True, "default": None},  # "state_dict": the entry holding it
    "bootstrap_model_prefix": {"type": "string", "nullable": True, "default": None},  # "module.": stripped from names
    "loss_function": {"type": "string", "required": True},  # F.mse_loss, or a function of yours
    "train_data_loader_type": {"type": "string", "required": True},
    "test_data_loader_type": {"type": "string", "nullable": True, "default": None},
    "eval_data_loader_type": {"type": "string", "nullable": True, "default": None},
    # Keyword arguments of the dataset classes: `all` for every split, then per phase.
    "data_loader_parameters": _section({phase: FREE_DICT for phase in ("all", "train", "test", "eval")}),
    "num_workers": {"type": "integer", "min": 0, "max": 1024, "default": 0},
    # Intra-op CPU threads (torch.set_num_threads); null: torch's default, one per core. Small
    # models on shared machines run several times faster with 1. It changes the order of
    # parallel sums, hence the last bits of results: it affects results, and --resume keeps it.
    "torch_threads": {"type": "integer", "min": 1, "max": 1024, "nullable": True, "default": None},
    # How long and how hard to train.
    "epochs": _count(required=True, meta=NEUTRAL),
    # Stop after this many optimizer steps in all (null: after `epochs`); when set, epochs does not limit.
    "max_steps": _count(nullable=True, default=None, meta=NEUTRAL),
    "batch_size": _count(required=True),
    "eval_batch_size": _count(nullable=True, default=None),
    "seed": {"type": "integer", "min": 0, "max": MAX_SEED, "default": 0},
    # "auto": deterministic algorithms on the CPU, fast ones on CUDA.
    "deterministic": {"type": ["boolean", "string"], "allowed": [True, False, "auto"], "default": "auto"},
    "optimizer": _section(
        {
            "type": {"type": "string", "default": "AdamW"},  # a class in torch.optim
            # 0 freezes the weights (a sanity check); above 1e6 float32 training overflows or diverges.
            "lr": _float(min=0.0, max=1.0e6, default=1.0e-3),
            "weight_decay": _float(min=0.0, default=0.0),
            "parameters": FREE_DICT,  # other keyword arguments of the optimizer
        }
    ),
    "scheduler": _section(  # learning rate per optimizer step: warmup, then the shape
        {
            "type": {"type": "string", "allowed": ["constant", "cosine", "linear"], "default": "constant"},
            "warmup_steps": _count(0, default=0),
            "final_lr_fraction": _float(min=0.0, max=1.0, default=0.0),
            # The schedule's length in optimizer steps; null: every step of `epochs` epochs.
            "total_steps": _count(nullable=True, default=None),
        }
    ),
    "gradient_accumulation_steps": _count(default=1),
    "gradient_clip_norm": _float(check_with=positive, nullable=True, default=None),  # > 0; null: off
    "mixed_precision": {"type": "string", "allowed": ["off", "fp16", "bf16"], "default": "off"},  # CUDA only
    # The expensive third phase.
    "rollout": _section(
        {
            "every_n_epochs": _count(default=1),  # and always after the last epoch
            "max_samples": _count(nullable=True, default=None),
            # The model's `figures` at each rollout (false: its metrics only; no result changes).
            "figures": {"type": "boolean", "default": True, "meta": NEUTRAL},
        }
    ),
    "evaluate_before_training": {"type": "boolean", "default": False},  # a step-0 baseline
    # Checkpoints and logging.
    "checkpoint_interval": _float(min=0.0, default=1800.0, meta=NEUTRAL),  # seconds; 0: epoch ends only
    "checkpoint": _section(
        {
            "monitor": {"type": "string", "nullable": True, "default": None},  # default: rollout/loss, val/loss...
            "mode": {"type": "string", "allowed": ["min", "max"], "default": "min"},
            "keep_recent": _count(default=2, meta=NEUTRAL),
            # Milestones never pruned (beside keep_recent, best and last), for a history to --evaluate:
            # checkpoints at steps that are multiples of N, and at the end of every N-th epoch.
            "keep_every_n_steps": _count(nullable=True, default=None, meta=NEUTRAL),
            "keep_every_n_epochs": _count(nullable=True, default=None, meta=NEUTRAL),
            # Mid-epoch checkpoints every N optimizer steps (beside every `checkpoint_interval` seconds).
            "every_n_steps": _count(nullable=True, default=None, meta=NEUTRAL),
        }
    ),
    # Stop when `checkpoint.monitor` has not improved by more than `min_delta` for `patience`
    # evaluations (null: never); the count is part of a checkpoint, so a resume stops alike.
    "early_stopping": _section(
        {
            "patience": _count(nullable=True, default=None),
            "min_delta": _float(min=0.0, default=0.0),
        }
    ),
    # Your model's metrics() on training batches too, logged as train/<name> at logging steps.
    "train_metrics": {"type": "boolean", "default": False},
    "log_every_n_steps": _count(default=50),
    # Where values go: metrics.jsonl (which --resume, --reproduce and --runs read, so it stays),
    # TensorBoard, and the optional experiment trackers (pip install -r requirements-trackers.txt).
    "loggers": {
        "type": "list",
        "allowed": ["tensorboard", "jsonl", "wandb", "mlflow"],
        "check_with": _keeps_jsonl,
        "default": ["tensorboard", "jsonl"],
        "meta": NEUTRAL,
    },
    # Null: the run's project (project_name or model_type), W&B's own default entity and mode
    # (WANDB_MODE; "offline" writes the run into RUN_DIR/wandb/ for a later `wandb sync`).
    "wandb": _section(
        {
            "project": {"type": "string", "nullable": True, "default": None},
            "entity": {"type": "string", "nullable": True, "default": None},
            "mode": {"type": "string", "allowed": ["online", "offline"], "nullable": True, "default": None},
        },
        meta=NEUTRAL,
    ),
    # Null: MLFLOW_TRACKING_URI, else a local SQLite store, logs/mlflow.db; the experiment is the run's project.
    "mlflow": _section(
        {
            "tracking_uri": {"type": "string", "nullable": True, "default": None},
            "experiment": {"type": "string", "nullable": True, "default": None},
        },
        meta=NEUTRAL,
    ),
    "progress_bar": {
        "type": ["boolean", "string"],
        "allowed": [True, False, "auto"],
        "default": "auto",
        "meta": NEUTRAL,
    },
    # Several processes (GPUs, nodes): `python run.py` starts them through torchrun when
    # nproc_per_node * nnodes > 1; a job started by torchrun itself uses backend and timeout.
    "distributed": _section(
        {
            "nproc_per_node": _count(default=1),
            "nnodes": _count(default=1),
            "rdzv_endpoint": {"type": "string", "nullable": True, "default": None},  # host:port of node 0
            "node_rank": _count(0, nullable=True, default=None),  # set: a static rendezvous (multigpu_parameters)
            "backend": {"type": "string", "allowed": ["auto", "nccl", "gloo"], "default": "auto"},
            "timeout_seconds": _float(min=1.0, max=MAX_SECONDS, default=600.0),  # a dead rank fails the job after this
            "max_restarts": _count(0, default=0),  # torchrun restarts, which resume
        },
        meta=NEUTRAL,
    ),
    # A sweep: dotted keys mapped to lists of values; the run expands to their cartesian product.
    "sweep": {
        "type": "dict",
        "nullable": True,
        "default": None,
        "keysrules": {"type": "string"},
        "valuesrules": {"type": "list", "minlength": 1},
        "meta": NEUTRAL,
    },
    "max_sweep_size": _count(default=1000, meta=NEUTRAL),  # a larger sweep is refused before it expands
    # How --slurm writes a sweep's array script (one task per member).
    "slurm": _section(
        {
            "partition": {"type": "string", "regex": SBATCH_VALUE, "nullable": True, "default": None},
            "time": {"type": "string", "check_with": slurm_time, "default": "01:00:00"},
            "nodes": _count(default=1),
            "gpus_per_node": _count(0, default=0),
            "cpus_per_task": _count(default=1),
            "mem": {"type": "string", "regex": SBATCH_VALUE, "nullable": True, "default": None},
            "account": {"type": "string", "regex": SBATCH_VALUE, "nullable": True, "default": None},
            "qos": {"type": "string", "regex": SBATCH_VALUE, "nullable": True, "default": None},
            "parallel": _count(nullable=True, default=None),  # the array's %N
            "extra_sbatch": {
                "type": "list",
                "schema": {"type": "string", "regex": SBATCH_OPTION},
                "default": [],
            },  # "--constraint=a100"
            "setup": {"type": "list", "schema": {"type": "string"}, "default": []},  # "module load cuda"
            "signal_seconds": _count(default=120),  # --requeue's warning
        },
        meta=NEUTRAL,
    ),
    # Where the run is mirrored while it trains (README, "Archiving runs to object storage").
    "archive": _section(
        {
            # s3://bucket/prefix, gs://bucket/prefix, file:///shared/runs; null: $TEMPLATE_ARCHIVE_URI, if set
            "uri": {"type": "string", "nullable": True, "default": None, "check_with": _archive_uri},
            "enabled": {"type": "boolean", "default": True},  # false: not even $TEMPLATE_ARCHIVE_URI
            # at most one upload pass per 30 s (0: after each checkpoint); then how long the end waits for the last
            "sync_interval_seconds": _float(min=0.0, max=MAX_SECONDS, default=30.0),
            "final_sync_timeout_seconds": _float(min=0.0, max=MAX_SECONDS, default=600.0),
        },
        meta=NEUTRAL,
    ),
    # The original template's multi-GPU section, mapped onto `distributed`.
    "multigpu_parameters": {
        "type": "dict",
        "nullable": True,
        "default": None,
        "meta": NEUTRAL,
        "schema": {
            "ngpus_per_node": _count(),
            "num_nodes": _count(),
            "node_idx": _count(0),
            "backend": {"type": "string", "allowed": ["auto", "nccl", "gloo"]},
            "url": {"type": "string"},
        },
    },
}


def project_schema() -> dict:
    """The template's keys plus yours (`USER_SCHEMA` in src/schema.py). A key of yours that
    the template already has is an error: it would silently replace the template's rule."""
    from src.schema import USER_SCHEMA

    clashes = sorted(TEMPLATE_SCHEMA.keys() & USER_SCHEMA.keys())
    if clashes:
        raise UserError(
            f"src/schema.py: USER_SCHEMA declares {', '.join(map(repr, clashes))}, which the template "
            "already declares in src/core/config/schema.py; rename yours (e.g. 'my_"
            f"{clashes[0]}'), or change the template's rule there if that is what you mean"
        )
    return {**TEMPLATE_SCHEMA, **USER_SCHEMA}
