"""The latents benchmark's code path (`python -m bench --only latents`), run small on the CPU: the
three sides write every sample, the report and the goals come out, and cuda is refused clearly
where torch sees no GPU."""

from __future__ import annotations

import pytest


def test_the_latents_bench_runs_small_on_the_cpu(tmp_path):
    import torch

    from bench import latents_bench

    report, goals = latents_bench.bench(
        6, 1, device="cpu", model_size="tiny", resolutions=(32, 64), batch=4, work=tmp_path, sides_px=(40, 90)
    )
    assert "32×32 and 64×64 from one decode" in report
    for side in (latents_bench.PLAIN, "torch DataLoader, 1 worker", latents_bench.PROJECT):
        assert f"| {side} " in report, report
    assert "n/a" in report  # no GPU utilisation on a CPU
    assert "Decoding alone (the project's 1 decode thread(s), no model)" in report
    assert len(goals) == 1 and goals[0].startswith("latents ≥ 0.9× a plain PyTorch loop (cpu, tiny models)")
    assert torch.get_num_threads() >= 1
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: torch sees no GPU"):
            latents_bench.bench(6, 1, device="cuda", work=tmp_path)


def test_the_sd_shapes_are_stable_diffusions():
    from bench.latents_bench import MODELS

    sd = MODELS["sd"]
    assert sd["vae_blocks"] == (128, 256, 512, 512) and sd["layers_per_block"] == 2
    assert sd["text_width"] == 768 and sd["text_layers"] == 12 and sd["text_intermediate"] == 3072
