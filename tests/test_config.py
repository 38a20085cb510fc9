"""The config pipeline: loading, each command-line edit, defaults, validation, the frozen config."""

import time

import pytest
from helpers import MINIMAL, REPO

from src.core.config.edits import ConfigEdits, apply_edits
from src.core.config.loader import load_yaml_file, parse_yaml
from src.core.config.schema import project_schema
from src.core.config.validation import Config, check_sweep_size, config_hash, finalize, load_config
from src.core.errors import UserError

SCHEMA = project_schema()


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(function, *args) -> str:
    with pytest.raises(UserError) as caught:
        function(*args)
    return str(caught.value)


# --- loading -------------------------------------------------------------------


def test_scientific_notation_is_a_float():
    assert parse_yaml("lr: 1e-3", "x") == {"lr": 0.001}
    assert parse_yaml("a: 1E5\nb: -2.5e+3\nc: 3\nd: '1e-3'", "x") == {"a": 1e5, "b": -2500.0, "c": 3, "d": "1e-3"}


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "description: ok\nepochs: [1, 2\nbatch_size: 3\n")
    message = error_of(load_yaml_file, path)
    assert str(path) in message and "line 3, column" in message


def test_duplicate_key_is_an_error(tmp_path):
    message = error_of(load_yaml_file, write(tmp_path, "epochs: 1\nbatch_size: 2\nepochs: 3\n"))
    assert "duplicate key 'epochs'" in message and "line 1" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", "is empty"), ("# only a comment\n", "is empty"), ("- a\n- b\n", "holds a list"), ("3\n", "holds a int")],
)
def test_empty_or_not_a_mapping(tmp_path, text, expected):
    assert expected in error_of(load_yaml_file, write(tmp_path, text))


def test_missing_file(tmp_path):
    assert "does not exist" in error_of(load_yaml_file, tmp_path / "nope.yaml")
    assert "is a directory" in error_of(load_yaml_file, tmp_path)
    assert "'/dev/null' is not a regular file; expected a YAML file" in error_of(load_yaml_file, "/dev/null")


# --- bounds: no YAML grows without bound once parsed ------------------------------


def alias_bomb(levels: int, width: int = 10) -> str:
    """`a0` holds `width` values, each `aN` holds `width` copies of `a(N-1)`: width**levels values."""
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    lines += [f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * width) + "]" for n in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (alias_bomb(9), "expands to more than 100000 values through aliases"),  # 10**9 values in 1 KB
        (alias_bomb(8) + "m: {<<: [" + ", ".join(["*a8"] * 10) + "]}\n", "expands to more than 100000"),  # merges
        ("a: &a [*a]\n", "a recursive alias: this value contains itself"),
        ("a: &a {b: {c: *a}}\n", "a recursive alias"),
        ("a: &a {<<: *a}\n", "a recursive alias"),  # PyYAML's merge would recurse forever
        ("a: " + "[" * 10_000 + "]" * 10_000 + "\n", "nests deeper than 32 levels"),
        ("a: " + "{b: " * 40 + "1" + "}" * 40 + "\n", "nests deeper than 32 levels"),
        ("a0: &a0 [1]\n" + "".join(f"a{n}: &a{n} [*a{n - 1}]\n" for n in range(1, 40)), "32 levels through"),
        ("[1, 2]: x\n", "line 1, column 1: a list used as a key; expected a plain key"),
        ("a:\n  ? {b: 1}\n  : x\n", "a mapping used as a key"),
        ("a: " + "7" * 5000 + "\n", "an integer of over 4000 digits"),
        ("a: 0x" + "f" * 4000 + "\n", "an integer of over 4000 digits"),  # no decimal digits: int() reads it
        ("a: " + ":".join(["59"] * 3000) + "\n", "an integer of over 4000 digits"),  # YAML 1.1 base 60
    ],
)
def test_yaml_that_would_grow_or_recurse_is_refused_at_once(text, expected):
    started = time.perf_counter()
    message = error_of(parse_yaml, text, "bomb.yaml")
    assert message.startswith("bomb.yaml: invalid YAML at line ") and expected in message
    assert time.perf_counter() - started < 2  # a bound, not a benchmark: these used to take minutes or never end


def test_bounds_leave_real_yaml_alone():
    text = "base: &base {lr: 1e-3, sizes: [1, 2]}\nrun: {<<: *base, lr: 2e-3}\nother: *base\nbig: " + "9" * 4000
    document = parse_yaml(text, "x")
    assert document["run"] == {"lr": 2e-3, "sizes": [1, 2]} and document["other"]["lr"] == 1e-3
    assert document["big"] == int("9" * 4000)
    parse_yaml(alias_bomb(4, width=8), "x")  # 8**4 values: far above a real config, below the bound
    parse_yaml("a: " + "[" * 30 + "]" * 30, "x")


def test_bounds_apply_to_command_line_values_and_large_files(tmp_path):
    edits = ConfigEdits(overrides=[("model_parameters.hidden_size", "&a [*a]")])
    assert "--model_parameters.hidden_size: invalid YAML" in error_of(apply_edits, DOCUMENT, edits, SCHEMA)
    bomb = "[" + ", ".join(["&x [" + ", ".join(["1"] * 400) + "]"] + ["*x"] * 400) + "]"
    edits = ConfigEdits(modify=[("model_parameters", f"{{layers: {bomb}}}")])
    assert "--modify model_parameters: invalid YAML" in error_of(apply_edits, DOCUMENT, edits, SCHEMA)
    big = write(tmp_path, "description: " + "x" * (2 * 1024 * 1024) + "\n")
    assert "expected at most 1048576 for a config" in error_of(load_yaml_file, big)


def test_saved_run_config_drops_its_provenance(tmp_path):
    text = MINIMAL + "git: {commit: abc}\nflags: {cpu: true}\ncommand_line: x\nenvironment: {}\ndata_fingerprint: {}\n"
    document = load_yaml_file(write(tmp_path, text))
    assert not {"git", "flags", "command_line", "environment", "data_fingerprint"} & document.keys()


# --- edits ---------------------------------------------------------------------

DOCUMENT = {
    "description": "data/ run",
    "data_directory": "data/pendulum",
    "model_parameters": {"hidden_size": 64, "names": ["data/a", {"deep": "data/b"}]},
    "epochs": 2,
}


def test_find_replace_reaches_every_string_at_any_depth_but_not_keys():
    edited = apply_edits({**DOCUMENT, "data/key": 1}, ConfigEdits(find_replace=[("data/", "/tmp/d/")]), SCHEMA)
    assert edited["description"] == "/tmp/d/ run"
    assert edited["data_directory"] == "/tmp/d/pendulum"
    assert edited["model_parameters"]["names"] == ["/tmp/d/a", {"deep": "/tmp/d/b"}]
    assert "data/key" in edited and edited["epochs"] == 2


def test_edits_do_not_change_the_input():
    document = {"model_parameters": {"hidden_size": 64}}
    apply_edits(document, ConfigEdits(modify=[("model_parameters.hidden_size", "8")]), SCHEMA)
    assert document == {"model_parameters": {"hidden_size": 64}}


def test_delete_top_level_and_dotted():
    edited = apply_edits(DOCUMENT, ConfigEdits(delete=["epochs", "model_parameters.hidden_size"]), SCHEMA)
    assert "epochs" not in edited and "hidden_size" not in edited["model_parameters"]


def test_delete_unknown_key_suggests():
    message = error_of(apply_edits, DOCUMENT, ConfigEdits(delete=["epoch"]), SCHEMA)
    assert "--delete epoch" in message and "did you mean 'epochs'" in message


def test_modify_parses_yaml_and_replaces_whole_value():
    edits = ConfigEdits(modify=[("epochs", "5"), ("model_parameters", "{hidden_size: 8}"), ("optimizer.lr", "1e-4")])
    edited = apply_edits(DOCUMENT, edits, SCHEMA)
    assert edited["epochs"] == 5
    assert edited["model_parameters"] == {"hidden_size": 8}
    assert edited["optimizer"] == {"lr": 1e-4}  # known to the schema, so it may be set


def test_modify_unknown_key_is_an_error_with_suggestion():
    message = error_of(apply_edits, DOCUMENT, ConfigEdits(modify=[("optimizer.lrr", "3")]), SCHEMA)
    assert "did you mean 'optimizer.lr'" in message
    assert "no such key" in error_of(apply_edits, DOCUMENT, ConfigEdits(modify=[("brand_new", "3")]), SCHEMA)
    assert "no such key" in error_of(apply_edits, DOCUMENT, ConfigEdits(overrides=[("rollout.new", "3")]), SCHEMA)


def test_keys_may_be_added_to_free_sections_which_the_constructors_check():
    edits = ConfigEdits(
        overrides=[("model_parameters.num_layers", "3"), ("optimizer.parameters.betas", "[0.8, 0.9]")],
        modify=[("data_loader_parameters.train.input_noise", "0.1")],
    )
    edited = apply_edits(DOCUMENT, edits, SCHEMA)
    assert edited["model_parameters"]["num_layers"] == 3
    assert edited["optimizer"]["parameters"] == {"betas": [0.8, 0.9]}
    assert edited["data_loader_parameters"]["train"] == {"input_noise": 0.1}


def test_overrides_apply_after_modify_and_parse_json_lists():
    edits = ConfigEdits(modify=[("epochs", "5")], overrides=[("epochs", "7"), ("model_parameters.names", '["x", "y"]')])
    edited = apply_edits(DOCUMENT, edits, SCHEMA)
    assert edited["epochs"] == 7 and edited["model_parameters"]["names"] == ["x", "y"]


def test_order_find_replace_then_delete_then_modify_then_override():
    edits = ConfigEdits(
        find_replace=[("pendulum", "other")],
        delete=["data_directory"],
        modify=[("data_directory", "modified")],
        overrides=[("description", "pendulum stays, as overrides come after find-replace")],
    )
    edited = apply_edits(DOCUMENT, edits, SCHEMA)
    assert edited["data_directory"] == "modified"
    assert edited["description"] == "pendulum stays, as overrides come after find-replace"


def test_setting_inside_a_non_section_is_an_error():
    message = error_of(apply_edits, {"optimizer": 3}, ConfigEdits(overrides=[("optimizer.lr", "1")]), SCHEMA)
    assert "'optimizer' holds a int, not a section" in message
    message = error_of(apply_edits, {"epochs": 3}, ConfigEdits(overrides=[("epochs.x", "1")]), SCHEMA)
    assert "no such key" in message and "did you mean 'epochs'" in message


# --- defaults and validation -----------------------------------------------------


def test_defaults_fill_nested_sections(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ConfigEdits(), SCHEMA)
    assert config.optimizer.lr == 1e-3 and config.optimizer.type == "AdamW"
    assert config.checkpoint.keep_recent == 2 and config.test_data_loader_type is None
    assert config.data_loader_parameters.all == {}


def test_integer_for_a_float_key_becomes_a_float(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "optimizer: {lr: 1}\n"), ConfigEdits(), SCHEMA)
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("epoch: 3\n", "unknown key 'epoch'; did you mean 'epochs'?"),
        ("optimizer: {lrr: 0.1}\n", "unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'?"),
        ("zzz_unrelated: 1\n", "unknown key 'zzz_unrelated' (not in src/schema.py)"),
        ("optimizer: {lr: fast}\n", "key 'optimizer.lr': must be of float type, found 'fast' (str)"),
        ("mixed_precision: fp8\n", "key 'mixed_precision': unallowed value fp8"),
        ("optimizer: {lr: true}\n", "must be of float type, found True (bool)"),
        ("seed: true\n", "key 'seed': must be of integer type, found True (bool)"),
        # ranges the machinery can use; NaN passes every min/max, so it is checked on its own
        ("seed: 18446744073709551616\n", "key 'seed': max value is 9223372036854775807"),
        ("seed: -1\n", "key 'seed': min value is 0"),
        ("eval_batch_size: 10000000000000000000\n", "key 'eval_batch_size': max value is 2147483647"),
        ("num_workers: 100000\n", "key 'num_workers': max value is 1024"),
        ("optimizer: {lr: .nan}\n", "key 'optimizer.lr': must be a finite number (not NaN or infinity), found nan"),
        ("optimizer: {lr: .inf}\n", "key 'optimizer.lr': must be a finite number"),
        ("optimizer: {lr: 1e308}\n", "key 'optimizer.lr': max value is 1000000.0, found 1e+308 (float)"),
        ("optimizer: {weight_decay: .inf}\n", "key 'optimizer.weight_decay': must be a finite number"),
        ("checkpoint_interval: .nan\n", "key 'checkpoint_interval': must be a finite number"),
        ("gradient_clip_norm: .nan\n", "key 'gradient_clip_norm': must be a finite number"),
        ("gradient_clip_norm: 0\n", "key 'gradient_clip_norm': must be above 0"),
        ("scheduler: {final_lr_fraction: .nan}\n", "key 'scheduler.final_lr_fraction': must be a finite number"),
        ("distributed: {timeout_seconds: .inf}\n", "key 'distributed.timeout_seconds': max value is 31536000.0"),
        ("slurm: {time: fast}\n", "key 'slurm.time': must be a Slurm time limit: minutes, MM:SS, HH:MM:SS"),
        ("slurm: {time: '1:2:3:4'}\n", "key 'slurm.time': must be a Slurm time limit"),
        ("run_name: " + "r" * 256 + "\n", "key 'run_name': must be at most 255 bytes (it names a directory; this"),
        ("project_name: " + "p" * 300 + "\n", "key 'project_name': must be at most 255 bytes"),
        ("max_sweep_size: 0\n", "key 'max_sweep_size': min value is 1"),
    ],
)
def test_validation_messages_name_key_expected_and_found(tmp_path, extra, expected):
    message = error_of(load_config, write(tmp_path, MINIMAL + extra), ConfigEdits(), SCHEMA)
    assert expected in message


@pytest.mark.parametrize("time_limit", ["90", "30:00", "01:00:00", "2-12", "2-12:30", "2-12:30:00", "INFINITE"])
def test_slurm_time_limits_in_every_form_sbatch_takes(tmp_path, time_limit):
    config = load_config(write(tmp_path, MINIMAL + f"slurm: {{time: '{time_limit}'}}\n"), ConfigEdits(), SCHEMA)
    assert config.slurm.time == time_limit


def test_sweep_size_is_refused_from_the_list_lengths_before_expanding():
    sweep = {f"model_parameters.k{n}": list(range(10)) for n in range(10)}  # 10**10 runs
    message = error_of(check_sweep_size, {"sweep": sweep}, SCHEMA)
    assert "config key 'sweep': " + " x ".join(["10"] * 10) + " values make 10000000000 runs" in message
    assert "more than max_sweep_size (1000)" in message
    assert check_sweep_size({"sweep": {"seed": [0, 1], "epochs": [1, 2, 3]}}, SCHEMA) == 6
    assert check_sweep_size({"sweep": {"seed": list(range(1500))}, "max_sweep_size": 2000}, SCHEMA) == 1500
    big = {"model_parameters": {"table": list(range(50_000))}, "sweep": {"seed": list(range(300))}}
    assert "300 runs (300 values) of a config of 50" in error_of(check_sweep_size, big, SCHEMA)  # 1.5 * 10**7
    message = error_of(check_sweep_size, {"max_sweep_size": "x"}, SCHEMA)
    assert "'max_sweep_size': expected a positive integer" in message


def test_missing_required_key_and_wrong_type_together(tmp_path):
    text = MINIMAL.replace("description: test\n", "").replace("epochs: 2", "epochs: three")
    message = error_of(load_config, write(tmp_path, text), ConfigEdits(), SCHEMA)
    assert "missing required key 'description'" in message
    assert "key 'epochs': must be of integer type, found 'three' (str)" in message


def test_original_template_layout_is_valid(tmp_path):
    original = MINIMAL + (
        "test_data_loader_type: PendulumSteps\neval_data_loader_type: PendulumTrajectories\n"
        "model_parameters: {hidden_size: 8}\ndata_loader_parameters: {all: {}, train: {}}\n"
        "checkpoint_interval: 3600\nmultigpu_parameters:\n  ngpus_per_node: 2\n  num_nodes: 1\n"
        "  node_idx: 0\n  backend: nccl\n  url: tcp://localhost:23456\n"
    )
    config = load_config(write(tmp_path, original), ConfigEdits(), SCHEMA)
    assert config.multigpu_parameters.ngpus_per_node == 2 and config.checkpoint_interval == 3600.0
    # Mapped onto `distributed` once, as the config is finalized; the original section kept as given.
    mapped = config.distributed
    assert (mapped.nproc_per_node, mapped.nnodes, mapped.node_rank) == (2, 1, 0)
    assert (mapped.backend, mapped.rdzv_endpoint, mapped.timeout_seconds) == ("nccl", "localhost:23456", 600.0)
    assert config.multigpu_parameters.to_dict() == {
        "ngpus_per_node": 2,
        "num_nodes": 1,
        "node_idx": 0,
        "backend": "nccl",
        "url": "tcp://localhost:23456",
    }
    unknown = original.replace("backend: nccl", "backend: mpi")
    assert "multigpu_parameters.backend" in error_of(load_config, write(tmp_path, unknown), ConfigEdits(), SCHEMA)


# --- the frozen config ---------------------------------------------------------------


def test_config_is_immutable_with_attribute_access(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "model_parameters: {sizes: [1, 2]}\n"), ConfigEdits(), SCHEMA)
    assert config.model_parameters.sizes == (1, 2) and config["epochs"] == 2
    with pytest.raises(AttributeError, match="read-only"):
        config.epochs = 3
    with pytest.raises(TypeError):
        config.model_parameters["sizes"] = 3
    with pytest.raises(AttributeError, match="no key 'nope'"):
        _ = config.nope
    plain = config.to_dict()
    plain["epochs"] = 9
    assert config.epochs == 2 and plain["model_parameters"]["sizes"] == [1, 2]


def test_config_hash_ignores_keys_that_do_not_change_results():
    base = finalize(parse_yaml(MINIMAL, "x"), SCHEMA)
    longer = finalize({**base.to_dict(), "epochs": 50, "description": "other"}, SCHEMA)
    other_lr = finalize({**base.to_dict(), "optimizer": {"lr": 0.5}}, SCHEMA)
    assert config_hash(base, SCHEMA) == config_hash(longer, SCHEMA)
    assert config_hash(base, SCHEMA) != config_hash(other_lr, SCHEMA)
    assert isinstance(base, Config)


def test_the_sample_config_trains_its_small_model_on_one_thread():
    """A 4.5k-parameter model runs several times faster on one intra-op thread than on one per core."""
    sample = parse_yaml((REPO / "sample_runconfig.yaml").read_text(), "sample")
    assert finalize(sample, SCHEMA).torch_threads == 1
