"""Command-line flags are made from the config dataclasses (megamdm/options.py): every setting has its
flag, every flag's help lists what it allows, and a flag left out never overrides a value that a
config file (or a checkpoint, tests/test_sampling.py) holds."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from megamdm.cli import finetune as finetune_cli
from megamdm.cli import preprocess as preprocess_cli
from megamdm.cli import sample as sample_cli
from megamdm.config import ConfigError, FinetuneConfig, PreprocessConfig, load_config_text
from megamdm.finetune import finetune_config
from megamdm.options import flag, given, show
from megamdm.sampling.settings import SampleConfig, SampleSettings

ROOT = Path(__file__).resolve().parents[1]

# (the command's parser, [(config class, section the flags write to, the fields that are flags; None: all)])
COMMANDS = {
    "megamdm-sample": (sample_cli.parser, [(SampleSettings, None, None), (SampleConfig, None, sample_cli.CANVAS)]),
    "megamdm-preprocess": (preprocess_cli.parser, [(PreprocessConfig, None, None)]),
    "megamdm-finetune": (
        finetune_cli.parser,
        [(FinetuneConfig, "finetune", None), *((cls, section, names) for cls, section, names in finetune_cli.SHARED)],
    ),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_setting_has_its_flag_and_its_help_lists_the_allowed_values(command):
    make, sections = COMMANDS[command]
    ap = make()
    by_flag = {s: a for a in ap._actions for s in a.option_strings}
    for cls, section, names in sections:
        for f in dataclasses.fields(cls):
            if names is not None and f.name not in names:
                continue
            action = by_flag.get(flag(f.name))
            assert action is not None, f"{command} has no {flag(f.name)} for {cls.__name__}.{f.name}"
            assert action.dest == (f"{section}.{f.name}" if section else f.name)
            assert f.metadata["help"] in action.help.replace("%%", "%")
            for value in f.metadata.get("choices", ()):
                assert show(value) in action.help, (command, f.name, value)
    ap.format_help()  # every help string formats (a stray % would raise here)


def test_the_sample_command_prints_its_settings_help():
    r = subprocess.run([sys.executable, str(ROOT / "tools/sample.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for f in dataclasses.fields(SampleSettings):
        assert flag(f.name) in text
    assert "sampled | raw | untempered" in text  # the drift the hand-written --confidence help had


def test_flags_left_out_are_absent_and_flags_given_are_typed():
    base = ["--checkpoint", "c", "--prompt", "x", "--out", "o"]
    assert given(sample_cli.parser().parse_args(base), SampleSettings) == {}
    assert given(sample_cli.parser().parse_args(base), SampleConfig) == {}  # no --seed: the checkpoint's
    args = sample_cli.parser().parse_args([*base, "--cfg-interval", "0.2,0.8", "--no-final-prediction", "--steps", "9"])
    assert given(args, SampleSettings) == {"cfg_interval": [0.2, 0.8], "final_prediction": False, "steps": 9}
    args = preprocess_cli.parser().parse_args(["--out", "o", "--tokenizer", "t", "--crop", "random"])
    assert PreprocessConfig(**given(args, PreprocessConfig)) == PreprocessConfig(crop="random")


def test_finetune_flags_override_the_file_and_the_file_overrides_finetunings_defaults(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("optim:\n  lr: 0.002\ntrain:\n  steps: 7\nfinetune:\n  lora_rank: 4\n")
    base = ["--checkpoint", "c"]
    _, cfg = finetune_cli.parse([*base])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.precision) == (1e-5, 0.0, "bf16")  # fine-tuning's defaults
    assert cfg.checkpoint.save_dir == "finetune_out" and cfg.finetune.export
    _, cfg = finetune_cli.parse([*base, "--config", str(path)])
    assert (cfg.optim.lr, cfg.train.steps, cfg.finetune.lora_rank) == (0.002, 7, 4)  # no flag: the file's
    _, cfg = finetune_cli.parse(
        [*base, "--config", str(path), "--lr", "3e-3", "--out", "run", "--no-export", "--lora-targets", "q_proj,v_proj"]
    )
    assert (cfg.optim.lr, cfg.train.steps, cfg.checkpoint.save_dir) == (3e-3, 7, "run")
    assert not cfg.finetune.export and cfg.finetune.lora_targets == ["q_proj", "v_proj"]


def test_fine_tunings_old_keys_are_refused_with_their_new_place(tmp_path, capsys):
    path = tmp_path / "old.yaml"
    path.write_text("finetune:\n  lr: 0.002\n  steps: 5\n")
    with pytest.raises(SystemExit) as e:
        finetune_cli.parse(["--checkpoint", "c", "--config", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("finetune.lr is now optim.lr (and 1 more finetune.* keys moved likewise)"), err
    migrated = load_config_text("finetune:\n  lr: 0.002\n  out: ft\n")  # a config saved by an older megamdm
    assert (migrated.optim.lr, migrated.checkpoint.save_dir) == (0.002, "ft")
    with pytest.raises(ConfigError, match="finetune.out is now checkpoint.save_dir"):
        finetune_config(overrides=["finetune.out=x"])


def test_a_bad_flag_is_one_line():
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools/finetune.py"), "--checkpoint", "c", "--precision", "fp16"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: argument --precision: invalid choice: 'fp16' (choose from 'auto', 'bf16', 'fp32', 'fp8') "
        "(see finetune.py --help)"
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "model.num_layers=2"], "model.* come from the checkpoint: fine-tuning cannot change them"),
        ([], "data.shards is empty"),
        (["data.shards=[/nonexistent/ds.zarr]"], "data.shards: /nonexistent/ds.zarr is not a folder"),
        (["--steps", "40", "data.shards=[/]"], "train.steps=40 does not pass optim.warmup_steps=50"),
        (["--deepspeed-config", "nope.json", "data.shards=[/]"], "finetune.deepspeed_config: nope.json not found"),
        (["--precision", "fp8", "data.shards=[/]"], "train.precision=fp8: fine-tuning trains in bf16 or fp32"),
    ],
)
def test_finetuning_refuses_what_it_cannot_follow_in_one_line_before_starting(tmp_path, args, message):
    """Overrides of the checkpoint's sections were ignored, a missing dataset failed after DeepSpeed's
    start-up, and fewer steps than the warm-up exported the input unchanged."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools/finetune.py"), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), r.stderr
    assert not (tmp_path / "o").exists()
