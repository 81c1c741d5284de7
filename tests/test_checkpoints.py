"""Checkpoints: one that belongs to another network is named in one line."""

import pytest
import torch
from helpers import TINY, compose_train

from prostate_seg.errors import ConfigError, DataError, UserError
from prostate_seg.inference.predictor import load_checkpoint
from prostate_seg.training.fit import train


def test_resuming_from_a_checkpoint_of_another_network_is_one_line(trained_run, prepared,
                                                                    tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "run"
    cfg = compose_train([*TINY, f"data.dir={prepared}", "model.net.features=[4,8]",
                         f"ckpt_path={ckpt}"], run_dir)
    with pytest.raises(ConfigError) as info:
        train(cfg)
    message = str(info.value)
    assert message.startswith(f"ckpt_path={ckpt}: its network does not match model.net=")
    assert "is [8, 1, 3, 3] in the checkpoint but [4, 1, 3, 3] in the model" in message
    assert "\n" not in message
    assert not (run_dir / "status.json").exists()  # refused before the run folder is claimed


def test_starting_from_a_file_that_is_no_checkpoint_is_one_line(prepared, tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    run_dir = tmp_path / "run"
    cfg = compose_train([*TINY, f"data.dir={prepared}", f"ckpt_path={tmp_path / 'notes.ckpt'}"],
                        run_dir)
    with pytest.raises(DataError, match=r"notes.ckpt: not a training checkpoint \(.+\)$"):
        train(cfg)
    assert not (run_dir / "status.json").exists()


def test_checkpoint_whose_weights_do_not_fit_its_own_config_is_one_line(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["cfg"]["model"]["net"]["features"] = [8, 16, 32]
    doctored = tmp_path / "doctored.ckpt"
    torch.save(checkpoint, doctored)
    with pytest.raises(DataError, match=r"doctored.ckpt: its weights do not match the network "
                                        r"its own config describes .*: layer bottleneck.0."
                                        r"weight is \[32, 16, 3, 3\] in the checkpoint but "
                                        r"\[64, 32, 3, 3\] in the model$"):
        load_checkpoint(doctored, torch.device("cpu"))


def test_a_start_checkpoint_of_weights_only_or_past_the_budget_is_one_line(trained_run,
                                                                         prepared, tmp_path):
    """Both would end inside Lightning's fit, after the run folder was claimed."""
    best = next((trained_run / "checkpoints").glob("best-*.ckpt"))
    last = trained_run / "checkpoints" / "last.ckpt"
    for ckpt, extra, message in [(best, [], "holds the network's weights only"),
                                 (last, ["trainer.max_epochs=1"], "past trainer.max_epochs=1")]:
        run_dir = tmp_path / ckpt.stem
        cfg = compose_train([*TINY, f"data.dir={prepared}", f"ckpt_path={ckpt}", *extra],
                            run_dir)
        with pytest.raises(UserError, match=message):
            train(cfg)
        assert not (run_dir / "status.json").exists()


def test_a_start_checkpoint_of_another_fold_is_refused(trained_run, prepared, tmp_path):
    """Fold 0's weights learnt fold 1's validation patients: a fold-1 run started from them
    would score them inflated and be pooled with honest fold-1 runs."""
    last = trained_run / "checkpoints" / "last.ckpt"
    stored = torch.load(last, weights_only=False)["hyper_parameters"]["cfg"]
    run_dir = tmp_path / "fold1"
    cfg = compose_train([*TINY, f"data.dir={prepared}", f"ckpt_path={last}", "data.fold=1",
                         "trainer.max_epochs=5"], run_dir)
    assert stored["split"]["fold"] != 1
    with pytest.raises(ConfigError, match=rf"^ckpt_path={last}: trained on \d+ patient\(s\) "
                                          r"that fold 1 holds out \(phantom"):
        train(cfg)
    assert not (run_dir / "status.json").exists()


def test_a_start_checkpoint_of_other_patients_named_alike_leaks_nothing(trained_run, prepared,
                                                                         tmp_path):
    """A model of another dataset whose patients are also named phantom000 ...: its split holds
    other patients than this one, so a fold-1 start from it is refused only for its epoch."""
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["cfg"]["split"]["train"].append("someone_else")
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    cfg = compose_train([*TINY, f"data.dir={prepared}", f"ckpt_path={other}", "data.fold=1",
                         "trainer.max_epochs=1"], tmp_path / "run")
    with pytest.raises(ConfigError, match="past trainer.max_epochs=1"):
        train(cfg)
