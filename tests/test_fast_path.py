"""The speed options change nothing but rounding; the throughput benchmark still runs."""

import json

import pytest
import torch
from helpers import REPO, TINY, compose_train, run_cli
from omegaconf import OmegaConf

from prostate_seg.module import SegmentationModule


def _module(prepared, tmp_path, *overrides):
    cfg = compose_train([*TINY, f"data.dir={prepared}", "model.net.features=[4,8]", *overrides],
                        tmp_path)
    return SegmentationModule(OmegaConf.to_container(cfg, resolve=True))


def test_fast_path_gives_the_plain_fp32_loss_within_bf16_rounding(prepared, tmp_path):
    torch.manual_seed(0)
    plain = _module(prepared, tmp_path)
    fast = _module(prepared, tmp_path, "model.compile=true", "model.channels_last=true")
    fast.net.load_state_dict(plain.net.state_dict())
    image = torch.rand(4, 1, 32, 32)
    mask = (torch.rand(4, 1, 32, 32) > 0.7).float()
    expected = plain.loss_fn(plain(image), mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = fast(image)
    assert logits.dtype == torch.bfloat16
    got = fast.loss_fn(logits, mask)
    assert got.item() == pytest.approx(expected.item(), rel=2e-2)
    assert torch.allclose(logits.float(), plain(image), atol=0.1)


@pytest.mark.slow
def test_throughput_benchmark_smoke_run(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_cli(str(REPO / "benchmarks" / "throughput.py"), "--smoke", "--json", str(out),
                     "--workdir", str(tmp_path / "work"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["plain_end_to_end"] > 0 and figures["framework_images_per_s"] > 0
    assert figures["speedup_vs_plain"] == pytest.approx(
        figures["framework_images_per_s"] / figures["plain_end_to_end"])
    assert figures["variants"][0]["name"].startswith("framework default")
