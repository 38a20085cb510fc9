"""The template's own config keys, as cerberus rules. Your keys go in `src/schema.py`.

`meta: {affects_results: false}` marks keys that `--resume` may change, because
they do not change what the run computes (how long it runs, how it reports).
"""

NEUTRAL = {"affects_results": False}


def to_float(value):
    """Let `lr: 1` mean 1.0, without turning strings or booleans into numbers."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _float(**rule) -> dict:
    return {"type": "float", "coerce": to_float, **rule}


def _section(schema: dict, **rule) -> dict:
    return {"type": "dict", "default": {}, "schema": schema, **rule}


def _archive_uri(field, value, error):
    """Refuse a URI holding credentials (they would be saved with the run) or of an unknown scheme."""
    if value:
        from src.core.archive import check_uri  # only when a config names an archive
        from src.core.errors import UserError

        try:
            check_uri(value)
        except UserError as problem:
            error(field, str(problem))


NAME = {"type": "string", "regex": r"[A-Za-z0-9][A-Za-z0-9._=,+-]*", "nullable": True, "default": None}
FREE_DICT = {"type": "dict", "default": {}}

TEMPLATE_SCHEMA = {
    # What the run is (free text, shown by `--runs`) and where it is logged.
    "description": {"type": "string", "required": True, "empty": False, "meta": NEUTRAL},
    "project_name": {**NAME, "meta": NEUTRAL},  # logs/<project_name or model_type>/...
    "run_name": {**NAME, "meta": NEUTRAL},  # .../<run_name or a timestamp>/
    # The model, the loss and the data: names resolved in src/model.py and src/data_loader.py.
    "data_directory": {"type": "string", "required": True, "empty": False},
    "model_type": {"type": "string", "required": True},
    "model_parameters": FREE_DICT,  # keyword arguments of the model class
    "bootstrap_model_file": {"type": "string", "nullable": True, "default": None},
    "loss_function": {"type": "string", "required": True},  # F.mse_loss, or a function of yours
    "train_data_loader_type": {"type": "string", "required": True},
    "test_data_loader_type": {"type": "string", "nullable": True, "default": None},
    "eval_data_loader_type": {"type": "string", "nullable": True, "default": None},
    # Keyword arguments of the dataset classes: `all` for every split, then per phase.
    "data_loader_parameters": _section({phase: FREE_DICT for phase in ("all", "train", "test", "eval")}),
    "num_workers": {"type": "integer", "min": 0, "default": 0},
    # How long and how hard to train.
    "epochs": {"type": "integer", "required": True, "min": 1, "meta": NEUTRAL},
    "batch_size": {"type": "integer", "required": True, "min": 1},
    "eval_batch_size": {"type": "integer", "min": 1, "nullable": True, "default": None},
    "seed": {"type": "integer", "default": 0},
    # "auto": deterministic algorithms on the CPU, fast ones on CUDA.
    "deterministic": {"type": ["boolean", "string"], "allowed": [True, False, "auto"], "default": "auto"},
    "optimizer": _section(
        {
            "type": {"type": "string", "default": "AdamW"},  # a class in torch.optim
            "lr": _float(min=0.0, default=1.0e-3),
            "weight_decay": _float(min=0.0, default=0.0),
            "parameters": FREE_DICT,  # other keyword arguments of the optimizer
        }
    ),
    "scheduler": _section(  # learning rate per optimizer step: warmup, then the shape
        {
            "type": {"type": "string", "allowed": ["constant", "cosine", "linear"], "default": "constant"},
            "warmup_steps": {"type": "integer", "min": 0, "default": 0},
            "final_lr_fraction": _float(min=0.0, max=1.0, default=0.0),
            # The schedule's length in optimizer steps; null: every step of `epochs` epochs.
            "total_steps": {"type": "integer", "min": 1, "nullable": True, "default": None},
        }
    ),
    "gradient_accumulation_steps": {"type": "integer", "min": 1, "default": 1},
    "gradient_clip_norm": _float(min=0.0, nullable=True, default=None),
    "mixed_precision": {"type": "string", "allowed": ["off", "fp16", "bf16"], "default": "off"},  # CUDA only
    # The expensive third phase.
    "rollout": _section(
        {
            "every_n_epochs": {"type": "integer", "min": 1, "default": 1},  # and always after the last epoch
            "max_samples": {"type": "integer", "min": 1, "nullable": True, "default": None},
        }
    ),
    "evaluate_before_training": {"type": "boolean", "default": False},  # a step-0 baseline
    # Checkpoints and logging.
    "checkpoint_interval": _float(min=0.0, default=1800.0, meta=NEUTRAL),  # seconds; 0: epoch ends only
    "checkpoint": _section(
        {
            "monitor": {"type": "string", "nullable": True, "default": None},  # default: rollout/loss, val/loss...
            "mode": {"type": "string", "allowed": ["min", "max"], "default": "min"},
            "keep_recent": {"type": "integer", "min": 1, "default": 2, "meta": NEUTRAL},
            # Mid-epoch checkpoints every N optimizer steps (beside every `checkpoint_interval` seconds).
            "every_n_steps": {"type": "integer", "min": 1, "nullable": True, "default": None, "meta": NEUTRAL},
        }
    ),
    "log_every_n_steps": {"type": "integer", "min": 1, "default": 50},
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
            "nproc_per_node": {"type": "integer", "min": 1, "default": 1},
            "nnodes": {"type": "integer", "min": 1, "default": 1},
            "rdzv_endpoint": {"type": "string", "nullable": True, "default": None},  # host:port of node 0
            "backend": {"type": "string", "allowed": ["auto", "nccl", "gloo"], "default": "auto"},
            "timeout_seconds": _float(min=1.0, default=600.0),  # a dead rank fails the job after this
            "max_restarts": {"type": "integer", "min": 0, "default": 0},  # torchrun restarts, which resume
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
    # How --slurm writes a sweep's array script (one task per member).
    "slurm": _section(
        {
            "partition": {"type": "string", "nullable": True, "default": None},
            "time": {"type": "string", "default": "01:00:00"},
            "nodes": {"type": "integer", "min": 1, "default": 1},
            "gpus_per_node": {"type": "integer", "min": 0, "default": 0},
            "cpus_per_task": {"type": "integer", "min": 1, "default": 1},
            "mem": {"type": "string", "nullable": True, "default": None},
            "account": {"type": "string", "nullable": True, "default": None},
            "qos": {"type": "string", "nullable": True, "default": None},
            "parallel": {"type": "integer", "min": 1, "nullable": True, "default": None},  # the array's %N
            "extra_sbatch": {"type": "list", "schema": {"type": "string"}, "default": []},  # "--constraint=a100"
            "setup": {"type": "list", "schema": {"type": "string"}, "default": []},  # "module load cuda"
            "signal_seconds": {"type": "integer", "min": 1, "default": 120},  # --requeue's warning
        },
        meta=NEUTRAL,
    ),
    # Where the run is mirrored while it trains (README, "Archiving runs to object storage").
    "archive": _section(
        {
            # s3://bucket/prefix, gs://bucket/prefix, file:///shared/runs; null: $TEMPLATE_ARCHIVE_URI, if set
            "uri": {"type": "string", "nullable": True, "default": None, "check_with": _archive_uri},
            "enabled": {"type": "boolean", "default": True},  # false: not even $TEMPLATE_ARCHIVE_URI
            "final_sync_timeout_seconds": _float(min=0.0, default=600.0),  # the wait for the last upload
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
            "ngpus_per_node": {"type": "integer", "min": 1},
            "num_nodes": {"type": "integer", "min": 1},
            "node_idx": {"type": "integer", "min": 0},
            "backend": {"type": "string"},
            "url": {"type": "string"},
        },
    },
}
