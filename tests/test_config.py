from pathlib import Path

import pytest

from megamdm.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_files_and_overrides(tmp_path):
    cfg = load_config(
        CONFIGS / "model/tiny.yaml", ["model.num_layers=6", "gce.group_sizes=[4,16]", "gce.group_weights=[0.1,0.05]"]
    )
    assert cfg.model.num_layers == 6
    assert cfg.model.hidden_size == 128  # from the file
    assert cfg.gce.group_sizes == [4, 16]


def test_base_files_are_merged_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  hidden_size: 96\n  num_layers: 3\n")
    (tmp_path / "b.yaml").write_text("_base_: [a.yaml]\nmodel:\n  num_layers: 5\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.model.hidden_size, cfg.model.num_layers) == (96, 5)


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  num_layrs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "model.num_layrs" in str(e.value) and "bad.yaml" in str(e.value)


def test_wrong_type_names_key_and_source(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*optim.lr"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"command line.*model.hidden_size"):
        load_config(None, ["model.hidden_size=big"])


def test_semantic_validation():
    with pytest.raises(ConfigError, match="group_weights"):
        load_config(None, ["gce.group_sizes=[8,64]", "gce.group_weights=[0.2]"])
    with pytest.raises(ConfigError, match="gce.grad_filter needs gce.impl=triton, not torch"):
        load_config(None, ["gce.grad_filter=0.0002"])
    assert load_config(None, ["gce.grad_filter=0.0002", "gce.impl=triton"]).gce.grad_filter == 0.0002
    with pytest.raises(ConfigError, match="num_query_groups"):
        load_config(None, ["model.num_attention_heads=6", "model.num_query_groups=4"])
    with pytest.raises(ConfigError, match=r"optim.lr_decay_style='wsd' is not one of cosine, .*WSD"):
        load_config(None, ["optim.lr_decay_style=wsd"])
    with pytest.raises(ConfigError, match=r"train.precision='bf8' is not one of auto, bf16, fp32, fp8$"):
        load_config(None, ["train.precision=bf8"])  # trained in bf16 before, silently
    with pytest.raises(ConfigError, match=r"train.recompute='some' is not one of null, full, selective"):
        load_config(None, ["train.recompute=some"])
    with pytest.raises(ConfigError, match=r"train.fp8_recipe='mx' is not one of tensorwise, delayed, blockwise, mxfp8$"):
        load_config(None, ["train.fp8_recipe=mx"])
    with pytest.raises(ConfigError, match=r"sample.policy='greedy' is not one of gumbel, maskgit, stratified"):
        load_config(None, ["sample.policy=greedy"])
    with pytest.raises(ConfigError, match=r"sample: top_p must be in \(0, 1\], got 2.0"):
        load_config(None, ["sample.top_p=2.0"])
    with pytest.raises(ConfigError, match=r"lr_wsd_decay_fraction=0.0 must be in \(0, 1\]"):
        load_config(None, ["optim.lr_decay_style=WSD", "optim.lr_wsd_decay_fraction=0"])


def test_keys_moved_out_of_train_are_named_and_old_saved_configs_migrate(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: train.lr is now optim.lr$"):
        load_config(None, ["train.lr=1e-3"])
    old = tmp_path / "config.yaml"  # what a checkpoint of megamdm < 0.2 holds
    old.write_text("train: {steps: 7, lr: 0.002, tensor_parallel: 2, save_dir: runs/x, log_interval: 5}\n")
    with pytest.raises(ConfigError, match=r"train.lr is now optim.lr \(and 3 more train.\* keys moved likewise\)"):
        load_config(old)
    cfg = load_config(old, migrate=True)
    assert (cfg.train.steps, cfg.optim.lr, cfg.parallel.tensor_parallel) == (7, 0.002, 2)
    assert (cfg.checkpoint.save_dir, cfg.logging.log_interval) == ("runs/x", 5)


@pytest.mark.parametrize("style", ["cosine", "WSD"])
def test_lr_schedule_warms_up_then_decays_to_min_lr(style):
    pytest.importorskip("megatron.core")
    import torch

    from megamdm.config import OptimConfig
    from megamdm.training.optim import build_scheduler

    optim = OptimConfig(warmup_steps=100, lr=1e-3, min_lr=1e-4, lr_decay_style=style, lr_wsd_decay_fraction=0.25)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    steps = 1000
    sched = build_scheduler(opt, optim, steps)
    lrs = []
    for _ in range(steps):
        sched.step(1)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[49] == pytest.approx(0.5e-3) and lrs[99] == pytest.approx(1e-3)  # linear warmup
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[99:], lrs[100:]))  # then never rises
    if style == "WSD":  # stable at the peak until the last 250 steps, then a linear anneal
        assert lrs[749] == pytest.approx(1e-3) and lrs[874] == pytest.approx(0.55e-3)
    else:
        assert lrs[549] == pytest.approx(0.55e-3)  # cosine half-way through the decay


def test_command_line_config_error_is_one_line_and_exit_2(capsys):
    import argparse

    from megamdm.config import add_config_args, parse_config_args

    ap = argparse.ArgumentParser()
    add_config_args(ap)
    args, cfg = parse_config_args(ap, ["model.num_layers=3"])
    assert cfg.model.num_layers == 3
    with pytest.raises(SystemExit) as e:
        parse_config_args(ap, ["model.num_layrs=3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "model.num_layrs" in err


def test_every_shipped_config_loads_and_validates():
    """Each YAML under configs/ (and its _base_ chain) parses into the schema and passes validation."""
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        cfg = load_config(path)
        assert cfg.model.hidden_size > 0, path


@pytest.mark.parametrize(
    "key,value,least",
    [
        ("checkpoint.save_interval", 0, 1),
        ("logging.log_interval", 0, 1),
        ("data.micro_batch_size", 0, 1),
        ("data.group_by_length", -1, 0),
    ],
)
def test_intervals_and_batch_sizes_are_checked_at_load(key, value, least):
    with pytest.raises(ConfigError, match=f"{key}={value} must be >= {least}"):
        load_config(None, [f"{key}={value}"])


def test_a_broken_latest_tracker_is_one_clear_error(tmp_path):
    from megamdm.formats.run_layout import TRACKER, RunLayoutError, latest_iteration, resolve_iteration_dir

    (tmp_path / TRACKER).write_text("garbage\n")
    with pytest.raises(RunLayoutError, match="holds 'garbage', not an iteration number"):
        latest_iteration(tmp_path)
    (tmp_path / TRACKER).write_text("12\n")
    with pytest.raises(RunLayoutError, match="names iteration 12, but iter_0000012 is not a complete checkpoint"):
        resolve_iteration_dir(tmp_path)
    (tmp_path / "iter_0000012").mkdir()
    (tmp_path / "iter_0000012" / ".metadata").write_bytes(b"")
    assert resolve_iteration_dir(tmp_path) == tmp_path / "iter_0000012"
