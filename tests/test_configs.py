"""Every config in conf/ composes, and the objects it describes can be built."""

import os
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose_train, run_cli
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from prostate_seg.command_line import config_problem
from prostate_seg.config import CONF_DIR, initialize_configs
from prostate_seg.training.checks import check_train_config
from prostate_seg.errors import ConfigError
from prostate_seg.losses import CombinedLoss, FocalTverskyLoss
from prostate_seg.training.module import build_loss

GROUPS = ["data", "augment", "model", "loss", "optimizer", "scheduler", "trainer", "callbacks",
          "logger", "paths", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_group_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_train([f"{group}={option}", "data.dir=."], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["data"]["batch_size"] >= 1


@pytest.mark.parametrize("loss", options("loss"))
def test_every_loss_builds_and_is_named(loss, tmp_path):
    import torch

    cfg = compose_train([f"loss={loss}", "data.dir=."], tmp_path)
    name, fn = build_loss(cfg.loss)
    value = fn(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4))
    assert value.ndim == 0 and value.item() > 0
    if loss == "bce_tversky":
        assert isinstance(fn, CombinedLoss) and name == "bce+tversky_a0.5"
    if loss == "focal_tversky":  # Abraham & Khan's setting, alpha weighting false positives
        assert isinstance(fn, FocalTverskyLoss) and name == "focal_tversky_a0.3_g1.333"
        assert (fn.alpha, fn.beta, fn.gamma) == pytest.approx((0.3, 0.7, 4 / 3))


def test_default_is_tversky_half_and_alpha_override_keeps_beta_complementary(tmp_path):
    cfg = compose_train(["loss.alpha=0.25", "data.dir=."], tmp_path)
    name, fn = build_loss(cfg.loss)
    assert (name, fn.alpha, fn.beta) == ("tversky_a0.25", 0.25, 0.75)
    cfg = compose_train(["loss.alpha=0.3", "loss.beta=0.3", "data.dir=."], tmp_path)
    assert build_loss(cfg.loss)[0] == "tversky_a0.3_b0.3"


def test_a_gamma_that_is_not_positive_is_one_line_naming_the_key(tmp_path):
    cfg = compose_train(["loss=focal_tversky", "loss.gamma=0", "data.dir=."], tmp_path)
    with pytest.raises(ConfigError, match=r"^loss.gamma=0: must be > 0$"):
        check_train_config(cfg)


@pytest.mark.parametrize("model, params", [("unet", 31.0e6), ("unet_small", 1.94e6)])
def test_models_build(model, params, tmp_path):
    cfg = compose_train([f"model={model}", "data.dir=.", "data.context_slices=2"], tmp_path)
    net = instantiate(cfg.model.net)
    assert net.down[0][0].in_channels == 5  # 2.5D: 2 neighbours each side
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(params, rel=0.02)


@pytest.mark.parametrize("trainer", ["cpu", "auto", "ddp_cpu"])
def test_cpu_trainers_instantiate(trainer, tmp_path):
    cfg = compose_train([*TINY, f"trainer={trainer}", "data.dir=."], tmp_path)
    built = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert built.max_epochs == 100


def test_gpu_defaults_are_fast_and_cpu_defaults_plain(tmp_path):
    gpu = compose_train(["trainer=gpu", "data.dir=."], tmp_path)
    assert gpu.trainer.precision == "bf16-mixed" and gpu.trainer.benchmark is True
    assert gpu.model.compile is True and gpu.model.channels_last is True
    assert gpu.optimizer.fused is True and gpu.data.pin_memory is True
    cpu = compose_train(["trainer=cpu", "data.dir=."], tmp_path)
    assert cpu.trainer.precision == "32-true" and cpu.model.compile is False


@pytest.mark.parametrize("cpuinfo, expected", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n", "bf16-mixed"),
    ("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n", "bf16-mixed"),
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n", "32-true"),  # bf16 only emulated
    ("model name\t: avx512_bf16 in a name\nflags\t\t: fpu avx2\n", "32-true"),
    ("", "32-true"),
    (None, "32-true"),  # no /proc (not Linux)
])
def test_cpu_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch, cpuinfo, expected):
    """experiment=cpu trains in bf16 where the CPU lists native bf16 arithmetic, else fp32."""
    from prostate_seg import config

    info = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        info.write_text(cpuinfo)
    monkeypatch.setattr(config, "_CPUINFO", str(info))
    assert config.cpu_precision() == expected
    cfg = compose_train(["experiment=cpu", "data.dir=."], tmp_path / "run")
    assert cfg.trainer.precision == expected


def test_auto_asks_torch_only_where_a_gpu_may_be(monkeypatch):
    """torch's answer wherever it is asked; no GPU (and no torch import) where none can be:
    every GPU hidden, or no NVIDIA driver device on the machine."""
    import torch

    from prostate_seg import config

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    may_have_one = any(Path(p).exists() for p in config._CUDA_DEVICE_FILES)
    assert config.uses_gpu("auto") == (may_have_one and torch.cuda.is_available())
    monkeypatch.setattr(config, "_CUDA_DEVICE_FILES", ("/nonexistent/nvidiactl",))
    assert config.uses_gpu("auto") is False and config.uses_gpu("gpu") is True
    monkeypatch.undo()
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert config.uses_gpu("auto") is False and config.default_precision("auto") == "32-true"


@pytest.mark.parametrize("overrides, folds, seeds", [
    ([], "0,1,2,3,4", "0,1,2"),
    (["study.seeds=[0]", "data.folds=3"], "0,1,2", "0"),
    (["study.folds=[1,3]"], "1,3", "0,1,2"),
])
def test_paper_experiment_sweeps_eight_losses_over_folds_and_seeds(tmp_path, overrides, folds,
                                                                    seeds):
    cfg = compose_train(["experiment=paper", "data.dir=.", *overrides], tmp_path)
    params = cfg.hydra.sweeper.params
    assert params.loss == "bce,tversky"  # loss.alpha applies to tversky only (the sweeper)
    assert params["loss.alpha"] == "0.25,0.35,0.45,0.5,0.65,0.75,0.85"
    assert params["data.fold"] == folds and params.seed == seeds
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.data.batch_size == 16
    assert cfg.optimizer.lr == 1e-4 and cfg.trainer.max_epochs == 100
    # the study's checkpoint: the best selection Dice, early stopping with patience 3; and
    # a researcher's callbacks=final on top of it leaves no early-stopping setting behind
    assert cfg.callbacks.model_checkpoint.monitor == "select/dice"
    assert cfg.callbacks.early_stopping.patience == 3
    final = compose_train(["experiment=paper", "data.dir=.", "callbacks=final", *overrides],
                          tmp_path).callbacks
    assert final.early_stopping is None and final.model_checkpoint.monitor is None
    # the study's augmentation: what acts is resize, rotate, flips and the scaling to [0, 1]
    acting = [type(t).__name__ for t in instantiate(cfg.data.train_transform).transforms if t.p]
    assert acting == ["Resize", "Rotate", "HorizontalFlip", "VerticalFlip", "Normalize"]
    # the study's U-Net: batch norm (the recipe's default is instance norm)
    net = instantiate(cfg.model.net, in_channels=1)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert compose_train(["data.dir=."], tmp_path).model.net.norm == "instance"


SWEEPERS = ["basic", "study", *options("hydra/sweeper")]


@pytest.mark.parametrize("sweeper", SWEEPERS)
def test_every_sweeper_composes(sweeper, tmp_path):
    """Settings of the project's sweepers must not leak into another (Hydra's Optuna sweeper
    refuses keys it does not know)."""
    cfg = compose_train([f"hydra/sweeper={sweeper}", "data.dir=."], tmp_path)
    assert cfg.hydra.sweeper._target_.rsplit(".", 1)[-1].endswith("Sweeper")


@pytest.mark.parametrize("name, overrides", [
    ("synthetic", ["output_dir=x"]), ("prepare", ["input_dir=x", "output_dir=y"]),
    ("evaluate", ["ckpt_path=x"]), ("predict", ["ckpt_path=x", "input=a", "output=b"])])
def test_tool_configs_compose(name, overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    assert all(OmegaConf.select(cfg, o.split("=")[0]) == o.split("=")[1] for o in overrides)


def test_launcher_configs_compose(tmp_path):
    for launcher in ("gpu_pool", "slurm", "submitit_local"):
        cfg = compose_train([f"hydra/launcher={launcher}", "data.dir=."], tmp_path)
        assert "_target_" in cfg.hydra.launcher
    slurm = compose_train(["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                           "hydra.launcher.account=lab", "data.dir=."], tmp_path)
    assert slurm.hydra.launcher.partition == "gpu" and slurm.hydra.launcher.gpus_per_node == 1
    assert slurm.hydra.launcher.max_num_timeout > 0


@pytest.mark.parametrize("argv, expected", [
    (["loss=focal"], "loss=focal: unknown loss; valid: bce, bce_tversky, dice, focal_tversky, "
                     "tversky"),
    (["hydra/launcher=spark"], "hydra/launcher=spark: unknown launcher; valid: basic, gpu_pool"),
    (["scheduler=null"], "scheduler=null: unknown scheduler; valid: cosine, plateau, poly (~scheduler "
                         "leaves it out)"),
    (["model=unet,unet_big"], "Ambiguous value for argument 'model=unet,unet_big'; 1. To use it "
                              "as a list"),  # all of Hydra's message, on one line
    (["data.image_size=[1"], "cannot parse the command line: no viable alternative at input "
                             "'[1'; See https://hydra.cc/"),
    (["hydra/launcher=gpu_pool", "hydra.launcher.jobs_per_gpu=two"],
     "Error merging override hydra.launcher.jobs_per_gpu=two: Value 'two' of type 'str' could "
     "not be converted to Integer"),
])
def test_unknown_group_options_give_one_line_with_the_valid_names(argv, expected):
    message = config_problem("train", argv)
    assert message.startswith(expected) and "\n" not in message


@pytest.mark.parametrize("config, argv, expected", [
    ("train", ["loss.alpa=0.3"], "loss.alpa: no such key; did you mean loss.alpha?"),
    ("train", ["data.imag_size=64"], "data.imag_size: no such key; did you mean data.image_size?"),
    ("train", ["lr=1e-3"], "lr: no such key; did you mean optimizer.lr?"),
    ("train", ["trainer.max_epoch=3"], "trainer.max_epoch: no such key; did you mean "
                                       "trainer.max_epochs?"),
    ("train", ["-m", "seed=0,1", "loss.alpa=0.3"],
     "loss.alpa: no such key; did you mean loss.alpha?"),
    ("train", ["~callbacks.early_stoping"],
     "callbacks.early_stoping: no such key; did you mean callbacks.early_stopping?"),
    ("train", ["hydra/launcher=slurm", "hydra.launcher.partitio=gpu"],
     "hydra.launcher.partitio: no such key; did you mean hydra.launcher.partition?"),
    ("train", ["loss.xyz=1"], "loss.xyz: no such key; loss has: _target_, alpha, beta, name, smooth"),
    # a key of other options of the group: dice fixes alpha = beta = 0.5, bce has none
    ("train", ["loss=dice", "loss.alpha=0.3"], "loss.alpha: loss=dice has no such key (the loss "
                                               "options that have it: focal_tversky, tversky)"),
    ("train", ["loss=bce", "loss.beta=0.3"], "loss.beta: loss=bce has no such key (the loss "
                                             "options that have it: focal_tversky, tversky)"),
    ("train", ["loss.alpa=0.3", "optimizer.l=1"],  # each named with the other left out
     "loss.alpa: no such key; did you mean loss.alpha?"),
    ("evaluate", ["ckpt_path=x", "subst=test"], "subst: no such key; did you mean subset?"),
    ("prepare", ["input_dir=a", "output_dir=b", "image_sise=64"],
     "image_sise: no such key; did you mean image_size?"),
    ("evaluate", [], "ckpt_path: required, not given (add ckpt_path=... to the command line)"),
    ("predict", ["ckpt_path=x"], "input, output: required, not given (add input=... output=... "),
])
def test_unknown_keys_name_the_closest_valid_ones_and_never_suggest_adding(config, argv,
                                                                            expected):
    message = config_problem(config, argv)
    assert message.startswith(expected) and "\n" not in message and "+" not in message


@pytest.mark.parametrize("argv, expected", [
    (["model=unet,unet_big"], "model=unet_big: unknown model; valid: monai_segresnet, "
                              "monai_unet, unet, unet_small"),
    (["loss=bce,tversky", "loss.alpa=0.3,0.5"], "loss.alpa: no such key; did you mean "
                                                "loss.alpha?"),
    (["loss=bce,focal_tversky", "loss.gama=1,2"],  # a key of an option that is not the default
     "loss.gama: no such key; did you mean loss.gamma?"),
    (["loss=bce,dice", "loss.alpha=0.3,0.5"],  # a key of options the sweep does not choose
     "loss.alpha: none of loss=bce,dice has it (the loss options that have it: focal_tversky, "
     "tversky)"),
])
def test_a_sweep_names_a_wrong_option_or_key_of_any_job_before_checking_one(argv, expected,
                                                                            tmp_path):
    """Every job is composed before the first is checked (data.dir is not even looked at)."""
    result = run_cli("train.py", "-m", *argv, "data.dir=nowhere", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == f"error: {expected}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config, argv", [
    ("train", ["-m", "loss=bce", "seed=3", "model=unet,unet_small", "+foo=1"]),
    ("train", ["-m", "loss=bce,tversky", "loss.alpha=0.25,0.5"]),  # a key of one swept option
    ("train", ["model=monai_unet", "model.net.channels=[8,16]"]),
    ("train", ["data.train_transform.transforms.1.limit=20", "~callbacks.early_stopping"]),
    ("train", ["~scheduler", "hydra.run.dir=x", "++trainer.gradient_clip_val=1"]),
    ("evaluate", ["--help"]),  # only prints: the checkpoint is not needed
    ("predict", ["ckpt_path=x", "input=a", "output=b"]),
])
def test_valid_command_lines_pass(config, argv):
    assert config_problem(config, argv) is None


def test_every_tool_finds_its_config_from_any_working_directory(tmp_path):
    """Each command line names a config in CONF_DIR, and a tool started elsewhere composes it
    from there (not from a conf/ of the current folder)."""
    import re

    repo = Path(__file__).resolve().parent.parent
    sources = [*repo.glob("*.py"), *(repo / "prostate_seg").rglob("*.py")]
    names = {m for path in sources
             for m in re.findall(r'hydra_entry\(.*?config_name="(\w+)"', path.read_text(), re.S)}
    assert names == {"train", "evaluate", "predict", "prepare", "synthetic"}
    assert all((CONF_DIR / f"{name}.yaml").is_file() for name in names)
    (tmp_path / "conf").mkdir()  # a decoy where a relative config path would look
    (tmp_path / "conf" / "train.yaml").write_text("seed: 12345\n")
    result = run_cli("train.py", "--cfg", "job", "data.dir=x", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    job = OmegaConf.create(result.stdout)
    assert job.seed == 0 and job.data._target_ == "prostate_seg.data.datamodule.SliceDataModule"


@pytest.mark.parametrize("max_epochs", [5, 7])
def test_poly_schedule_is_nnunets_decay_per_epoch(max_epochs, tmp_path):
    """lr_e = lr * (1 - e / max_epochs) ** 0.9 for e = 0 ... max_epochs - 1 (nnU-Net's
    PolyLRScheduler), then 0."""
    import torch

    cfg = compose_train(["scheduler=poly", f"trainer.max_epochs={max_epochs}",
                         "optimizer.lr=0.01", "optimizer.fused=false", "data.dir=."], tmp_path)
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer)
    used = []
    for _ in range(max_epochs + 2):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()  # once per epoch, as Lightning does with interval="epoch"
    expected = [0.01 * (1 - e / max_epochs) ** 0.9 for e in range(max_epochs)] + [0.0, 0.0]
    assert used == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_help_lists_every_group_with_its_options_and_examples_that_compose():
    import re
    import shlex

    result = run_cli("train.py", "--help")
    assert result.returncode == 0 and "powered by Hydra" not in result.stdout
    for group in GROUPS:
        if options(group):
            assert f"{group}: {', '.join(options(group))}" in result.stdout
    launchers = re.search(r"hydra/launcher=\.\.\.\): (.*?)\.\n", result.stdout, re.S).group(1)
    GlobalHydra.instance().clear()
    with initialize_configs():
        valid = GlobalHydra.instance().config_loader().get_group_options("hydra/launcher")
    named = [item.split()[0] for item in re.sub(r"\(.*?\)", "", launchers).split(",")]
    assert len(named) == 4 and set(named) <= set(valid)
    examples = [line.split("#")[0] for line in result.stdout.splitlines()
                if line.strip().startswith("python train.py") and "[" not in line]
    assert len(examples) >= 5
    for line in examples:
        assert config_problem("train", shlex.split(line)[2:]) is None, line


@pytest.mark.parametrize("tool, required", [("prepare", "input_dir: ???"),
                                            ("synthetic", "output_dir: ???")])
def test_tool_help_says_what_to_type_and_lists_the_settings(tool, required):
    result = run_cli("-m", "prostate_seg", tool, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"python -m prostate_seg {tool} ") and required in result.stdout


def test_cpu_threads_follow_the_idle_cores_less_the_loader_workers(monkeypatch):
    import prostate_seg.config as config

    measured = config.idle_cpus(0.05)
    assert 0.0 <= measured <= (os.cpu_count() or 1) + 1e-9
    monkeypatch.setenv("PROSTATE_SEG_CPUS", "4")
    monkeypatch.setattr(config, "idle_cpus", lambda: 3.8)
    assert config.configure_cpu_threads(workers=0) == 4
    assert config.configure_cpu_threads(workers=1) == 3
    monkeypatch.setattr(config, "idle_cpus", lambda: 1.2)  # another process holds the rest
    assert config.configure_cpu_threads(workers=0) == 1
    assert config.configure_cpu_threads(workers=2) == 1  # never none
    import torch

    assert torch.get_num_threads() == 1


def test_a_dry_run_without_a_sweep_is_refused_before_it_trains():
    assert config_problem("train", ["data.dir=.", "hydra.sweeper.dry_run=true"]) == (
        "hydra.sweeper.dry_run=true: lists a sweep's jobs (add -m); without -m this is one run, "
        "which would train")


def test_a_list_given_for_a_number_says_how_to_sweep():
    assert config_problem("train", ["loss.alpha=[0.25,0.5]"]) == (
        "loss.alpha=[0.25, 0.5]: must be a number in [0, 1] (a sweep over values: "
        "-m loss.alpha=0.25,0.5)")
    for values in ("[]", "[2,3]", "[[0.1]]"):  # no sweep of these would pass either
        assert config_problem("train", [f"loss.alpha={values}"]).endswith("in [0, 1]")
