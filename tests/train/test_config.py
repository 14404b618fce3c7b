"""Config files and overrides: configs/*.toml are the Table 1 rows at paper-base, the no-argument
default is the tiny EG-MLA run written out in configs/tiny.toml, unknown keys suggest the closest."""
from pathlib import Path

import pytest

from egmla.configfile import load_toml
from egmla.train.cli import add_arguments, resolve_config
from egmla.train.config import RunConfig
from egmla.variants import VARIANTS, check_configs, variant_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TABLE_1 = {"mha": 18432, "mla-kv256": 3840, "mla-kv64": 1536, "mla-kv16": 960, "egmla-kv256": 3840,
           "egmla-kv64": 1536, "egmla-kv16": 960, "gqa4": 6144}  # KV elements/token, docs/design.md §3


def parse(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_config_file_loads(path):
    run = RunConfig.from_dict(load_toml(path))
    if path.stem == "tiny":
        assert run.to_dict() == {**RunConfig().to_dict(), "name": run.name}  # == `egmla train` with no args
        return
    assert run.name == path.stem
    assert run.train.compile and run.train.seq_len == 1024 and run.data.corpus == "python-source"


def test_config_files_are_the_variant_table():
    """configs/NAME.toml for every variant of egmla.variants and for nothing else, each [model] equal to
    the table's variant at paper-base."""
    assert check_configs(CONFIGS) == []


def test_table_1_rows_and_ablations_are_all_there():
    stems = {p.stem for p in CONFIGS.glob("*.toml")}
    assert set(TABLE_1) <= stems
    assert {"egmla-kv64-no-norm", "egmla-kv64-add", "egmla-kv64-latent"} <= stems
    assert {f"egmla-kv64-de{d}" for d in (64, 128, 256, 1024, 2048)} <= stems  # de512 is egmla-kv64
    for stem, elements in TABLE_1.items():
        assert RunConfig.from_dict(load_toml(CONFIGS / f"{stem}.toml")).model.kv_elements_per_token() == elements
    train_sections = {str(load_toml(CONFIGS / f"{s}.toml")["train"]) for s in stems - {"tiny"}}
    assert len(train_sections) == 1  # same budget, seed and schedule for every row


def test_no_arguments_is_the_tiny_egmla_preset_on_the_embedded_corpus():
    run, run_dir, resume = resolve_config(parse())
    model = run.model
    assert (model.attention, model.d_model, model.n_layers, model.vocab_size) == ("eg-mla", 256, 4, 8192)
    assert run.data.corpus == "embedded" and run_dir is None and not resume


def test_set_overrides_and_their_errors(tmp_path):
    run, _, _ = resolve_config(parse("--set", "model.attention=mla", "--set", "train.steps=7",
                                     "--set", "train.warmup_steps=7", "--set", "data.corpus=python-source"))
    assert (run.model.attention, run.train.steps, run.data.corpus) == ("mla", 7, "python-source")
    with pytest.raises(ValueError, match="train.warmup: unknown config key; did you mean 'warmup_steps'"):
        resolve_config(parse("--set", "train.warmup=10"))
    with pytest.raises(ValueError, match="train.lr_max: unknown config key; known keys: steps, batch_size"):
        resolve_config(parse("--set", "train.lr_max=1"))
    with pytest.raises(ValueError, match="train.schedule='linear': choose one of cosine, wsd, constant"):
        resolve_config(parse("--set", "train.schedule=linear"))
    with pytest.raises(ValueError, match="no such file"):
        resolve_config(parse("--config", str(tmp_path / "missing.toml")))
    with pytest.raises(ValueError, match="only train"):
        (tmp_path / "config.json").write_text('{"format_version": 1, "model": {}, "train": {}, "data": {}}')
        resolve_config(parse("--resume", str(tmp_path), "--set", "model.kv_lora_rank=8"))


@pytest.mark.parametrize("item, message", [
    ("steps=10", "steps: unknown config section; did you mean 'train.steps'?"),
    ("kv_lora_rank=16", "kv_lora_rank: unknown config section; did you mean 'model.kv_lora_rank'?"),
    ("corpus=python-source", "corpus: unknown config section; did you mean 'data.corpus'?"),
    ("trian.steps=3", "trian: unknown config section; did you mean 'train'?"),
])
def test_a_bare_key_names_its_section(item, message):
    """`--set steps=10` (or `steps = 10` above a file's [train]) named only the sections: the key's own is the hint."""
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("?", r"\?")):
        resolve_config(parse("--set", item))


def test_variant_names_suggest_the_closest():
    assert set(VARIANTS) >= {"mha", "mla-kv64", "egmla-kv64"}
    with pytest.raises(ValueError, match="did you mean 'egmla-kv64'"):
        variant_config("egmla-kv46")


# Each bad value the reliability issue found accepted (or crashing later), through --set, and the line it gets.
BAD_VALUES = [
    ("train.steps=2.5", r"train.steps=2.5: must be a valid integer"),
    ("train.keep_checkpoints=1.5", r"train.keep_checkpoints=1.5: must be a valid integer"),
    ("train.steps=abc", r"train.steps='abc': must be a valid integer"),
    ('train.lr="fast"', r"train.lr='fast': must be a valid number"),
    ("train.batch_size=8.0", r"train.batch_size=8.0: must be a valid integer"),
    ("train.tensorboard=maybe", r"train.tensorboard='maybe': must be true or false"),
    ("train.compile=2", r"train.compile=2: must be true or false"),
    ("train.grad_clip=-1", r"train.grad_clip=-1: must be greater than or equal to 0"),
    ("train.weight_decay=-5", r"train.weight_decay=-5: must be greater than or equal to 0"),
    ("train.beta2=1.5", r"train.beta2=1.5: must be less than 1"),
    ("train.lr=nan", r"train.lr=nan: must be greater than 0"),
    ("train.lr=inf", r"train.lr=inf: must be a finite number"),
    ("train.eps=inf", r"train.eps=inf: must be a finite number"),
    ("model.rope_theta=inf", r"^model.rope_theta=inf: must be a finite number"),
    ("model.preset=huge", r"^model.preset='huge': unknown preset"),
    ("train.steps.x=5", r"train.steps=\{'x': 5\}: must be a valid integer"),
    ("model.d_model=64.5", r"^model.d_model=64.5: must be a valid integer"),
    ("model.n_layers=2.5", r"^model.n_layers=2.5: must be a valid integer"),
    ("model.init_std=-1", r"^model.init_std=-1: must be greater than 0"),
    ("model.norm_eps=0", r"^model.norm_eps=0: must be greater than 0"),
    ("model.kv_lora_rank=512", r"^model.kv_lora_rank=512: a latent wider than d_model=256 compresses nothing"),
    ("model.gate_op=xor", r"^model.gate_op='xor': choose one of mul, add"),
    ("train.gate_table_update=sparse", r"train.gate_table_update=.sparse.: choose one of dense, row-sparse"),
    ("train.compile_mode=fast", r"train.compile_mode=.fast.: choose one of auto, default, reduce-overhead, "),
    ("train.compile_mode=reduce-overhead", r"train.compile_mode='reduce-overhead' needs train.compile=true"),
    ("data.val_fraction=1.0", r"data.val_fraction=1.0: must be less than 1"),
    ("data.max_bytes=1e6", r"data.max_bytes=1000000.0: must be a valid integer"),
    ("name=5", r"""^name=5: must be a string \(it names the run's folder\); quote it, e.g. name = "5" """),
    ("name=true", r"^name=True: must be a string"),
]


@pytest.mark.parametrize("override,error", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_every_bad_value_is_one_line_naming_field_value_and_what_is_allowed(override, error):
    with pytest.raises(ValueError, match=error) as raised:
        resolve_config(parse("--set", override))
    assert "\n" not in str(raised.value)


def test_python_gets_the_same_checks_as_toml_and_set():
    from egmla.config import ModelConfig
    from egmla.data.config import DataConfig
    from egmla.train.config import TrainConfig

    with pytest.raises(ValueError, match=r"^train.steps=2.5: must be a valid integer$"):
        TrainConfig(steps=2.5)
    with pytest.raises(ValueError, match=r"^d_model=64.5: must be a valid integer$"):
        ModelConfig(d_model=64.5)
    with pytest.raises(ValueError, match=r"^data.corpus=5: must be a valid string$"):
        DataConfig(corpus=5)
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)  # an int is a fine float
    assert resolve_config(parse("--set", "train.compile=True"))[0].train.compile is True


def test_compile_mode_auto_takes_cuda_graphs_only_for_one_cuda_process():
    """'auto' (the default) is reduce-overhead where it was measured to pay and be exact (compiling, one CUDA
    process), default elsewhere; an explicit mode is kept."""
    from egmla.train.config import TrainConfig, resolve_compile_mode

    assert TrainConfig().compile_mode == "auto"
    assert resolve_compile_mode("auto", True, "cuda", 1) == "reduce-overhead"
    assert resolve_compile_mode("auto", False, "cuda", 1) == "default"
    assert resolve_compile_mode("auto", True, "cpu", 1) == "default"
    assert resolve_compile_mode("auto", True, "cuda", 2) == "default"
    assert resolve_compile_mode("default", True, "cuda", 1) == "default"
    assert resolve_compile_mode("max-autotune", True, "cuda", 4) == "max-autotune"


def test_a_warmup_longer_than_the_run_is_named_but_runs():
    """train.warmup_steps > train.steps was taken silently: the learning rate never reached train.lr. It is a warning
    (a quick look, `--set train.steps=20` under the default warmup of 60, stays one --set; stored runs keep loading);
    a warmup of the whole run is a schedule (it ends at the peak), and a time-budgeted run (steps 0) sets its length
    later."""
    from egmla.train.config import TrainConfig, warmup_warning
    from egmla.train.optim import lr_at

    assert warmup_warning(TrainConfig(steps=10)) == (  # the default warmup of 60
        "warning: train.warmup_steps=60 is longer than the run (train.steps=10): the learning rate rises to 17% of "
        "train.lr and never decays; for the whole schedule use --set train.warmup_steps=1 (any value <= 10)")
    whole = TrainConfig(steps=10, warmup_steps=10, lr=1.0)
    assert warmup_warning(whole) is None
    assert [lr_at(step, whole) for step in (0, 9)] == [0.1, 1.0]
    assert warmup_warning(TrainConfig(steps=0, time_limit_s=60, warmup_steps=100)) is None
    assert resolve_config(parse("--set", "train.steps=7"))[0].train.warmup_steps == 60  # accepted


def test_a_run_sized_for_a_gpu_is_named_before_it_starts_on_the_cpu():
    """`egmla train --config configs/egmla-kv64.toml` on a CPU started preparing 300 MB of data without a word, for
    a run of thousands of times the default's work. It is told so at once, as a multiple of the default run's
    FLOPs (not a guess at the machine's speed), with how to shrink it; on a GPU, or at the default's size, nothing."""
    from egmla.train.config import cpu_work_warning

    paper_base = resolve_config(parse("--config", str(CONFIGS / "egmla-kv64.toml")))[0]
    warning = cpu_work_warning(paper_base, "cpu")
    assert warning.startswith("warning: this run trains on the CPU and is 4,339x the default `egmla train` run's "
                              "training FLOPs (1.1e+17: 2,000 steps of 64 x 1024 tokens, 768 wide, 12 layers)")
    assert warning.endswith("one of its steps is 2.2x the default run's whole training: for a look here shrink "
                            "train.batch_size and train.seq_len too")
    assert cpu_work_warning(paper_base, "cuda") is None
    long_tiny = resolve_config(parse("--set", "train.steps=40000"))[0]
    assert cpu_work_warning(long_tiny, "cpu").endswith("--set train.steps=800 keeps it to the default run's work")
    assert cpu_work_warning(resolve_config(parse())[0], "cpu") is None
    budgeted = resolve_config(parse("--config", str(CONFIGS / "egmla-kv64.toml"), "--set", "train.steps=0",
                                    "--set", "train.time_limit_s=60"))[0]
    assert cpu_work_warning(budgeted, "cpu") is None  # a time budget bounds it


def test_a_name_that_is_not_a_string_is_refused_not_turned_into_one(tmp_path):
    """`name = 5` in a TOML file became the name "5" silently (str() of whatever was there); a string field of any
    section refuses a number, as data.* and model.* fields do. --set values still parse as TOML literals: a word is
    a string, a quoted number is a string."""
    for value in ("5", "true", "[1]", "{a = 1}"):
        (tmp_path / "run.toml").write_text(f"name = {value}\n")
        with pytest.raises(ValueError, match=r"^name=.*: must be a string \(it names the run's folder\)"):
            resolve_config(parse("--config", str(tmp_path / "run.toml")))
    assert resolve_config(parse("--set", "name=run5"))[0].name == "run5"
    assert resolve_config(parse("--set", 'name="5"'))[0].name == "5"
    assert resolve_config(parse("--set", "name='2024.1'"))[0].name == "2024.1"
    with pytest.raises(ValueError, match=r"^name=2024.1: must be a string"):
        resolve_config(parse("--set", "name=2024.1"))
    with pytest.raises(ValueError, match=r"^name=5: must be a string"):
        RunConfig(name=5)
