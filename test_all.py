"""Tests: properties of every concept, on CPU, in about two minutes.  Run: python -m pytest -q test_all.py

Each test names the failure it would catch; several come from audits of earlier JEPA codebases
(context silently shrinking, padding contamination, EMA before the step, modules missing from the
optimizer, gradients cut by .item() or casts, the reference mask sampler's blind spots).
"""
import functools
import io
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import tqdm
from PIL import Image
from torch.utils.data import DataLoader

import data
import eval_probe
import losses
import masks
import model
import runs
import train

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here"))])
def device(request):
    """The device-generic tests take this fixture: each runs on the CPU always, and again on CUDA where
    there is a GPU (test ids end in [cuda]; `python bench.py --gpu-check OUT` runs them with -k cuda).
    On CUDA, fp32 matmuls stay full fp32 (no TF32) while the test runs, so its tolerances mean the same."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield torch.device("cuda")
    finally:
        torch.set_float32_matmul_precision(previous)


def bounding_boxes(flat, grid):
    """For boolean masks (R, N): (area, box height, box width) of each row."""
    h, w = grid
    m = flat.view(-1, h, w)
    rows, cols = m.any(2), m.any(1)                                   # (R, h), (R, w)
    def extent(x):
        idx = torch.arange(x.shape[1])
        first = torch.where(x, idx, x.shape[1]).min(1).values
        last = torch.where(x, idx, -1).max(1).values
        return last - first + 1
    return flat.sum(1), extent(rows), extent(cols)


# ============================================================================= masks.py

@pytest.mark.parametrize("grid", [(6, 6), (8, 8), (14, 14), (16, 16)])
def test_mask_invariants_over_10k_samples(grid):
    cfg = masks.MaskConfig()
    n = grid[0] * grid[1]
    drawn = masks.sample_masks(10_000, grid, torch.Generator().manual_seed(0))
    # the context block keeps its promise: area in [0.85 N, N], a square rectangle (aspect 1.0)
    area, bh, bw = bounding_boxes(drawn.block, grid)
    assert (area >= math.ceil(0.85 * n)).all() and (area <= n).all()
    assert (area == bh * bw).all() and (bh == bw).all()
    # targets are removed from the context; the context is exactly block minus targets
    assert not (drawn.context[:, None] & drawn.targets).any()
    assert torch.equal(drawn.context, drawn.block & ~drawn.targets.any(1))
    # every target is a rectangle within its scale and aspect bounds (the rounding rule is exact)
    area, bh, bw = bounding_boxes(drawn.targets.flatten(0, 1), grid)
    assert (area == bh * bw).all()
    assert (area >= cfg.target_scale[0] * n - 1e-9).all() and (area <= cfg.target_scale[1] * n + 1e-9).all()
    aspect = bh / bw
    assert (aspect >= cfg.target_aspect[0] - 1e-9).all() and (aspect <= cfg.target_aspect[1] + 1e-9).all()
    # the last row and column are reachable, for targets and for context (the reference never samples them)
    assert drawn.targets.any(1).any(0).all() and drawn.context.any(0).all()
    assert (drawn.context.sum(1) >= cfg.min_keep).all()


def test_context_block_reaches_the_whole_image_on_14x14():
    # the reference sampler always gives 13x13 on 14x14; here both 13x13 and 14x14 occur
    drawn = masks.sample_masks(2000, (14, 14), torch.Generator().manual_seed(1))
    areas = set(drawn.block.sum(1).tolist())
    assert areas == {169, 196}


def test_block_shapes_follow_the_documented_rounding_rule():
    """Re-derive each shape with a slow, independent reading of the rule in masks.py's docstring."""
    grid, scale, aspect = (14, 14), (0.15, 0.2), (0.75, 1.5)
    n = 196
    shapes = masks.sample_block_shapes(300, grid, scale, aspect, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(300, generator=g)
    a = torch.exp(math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * torch.rand(300, generator=g))
    for i in range(300):
        ideal_h, ideal_w = math.sqrt(s[i] * n * a[i]), math.sqrt(s[i] * n / a[i])
        best = min(((bh, bw) for bh in range(1, 15) for bw in range(1, 15)
                    if 0.15 * n <= bh * bw <= 0.2 * n and 0.75 <= bh / bw <= 1.5),
                   key=lambda hw: (math.log(hw[0] / ideal_h)) ** 2 + (math.log(hw[1] / ideal_w)) ** 2)
        assert tuple(shapes[i].tolist()) == best


def test_scale_and_aspect_are_drawn_independently():
    # the reference draws both from one number, so large blocks are always the tall ones
    shapes = masks.sample_block_shapes(20_000, (16, 16), (0.15, 0.2), (0.75, 1.5), torch.Generator().manual_seed(0))
    area, tall = shapes.prod(1), shapes[:, 0] > shapes[:, 1]
    small, large = area <= area.median(), area >= area.median()
    for size in (small, large):
        assert tall[size].any() and (~tall[size]).any()


def test_small_grids_work_or_fail_clearly_and_never_hang():
    masks.sample_masks(64, (5, 5))  # 5x5 admits 2x2 targets and a 5x5 context block
    masks.sample_masks(64, (8, 8))  # 64 px with patch 8: the reference loops forever here
    with pytest.raises(ValueError, match="4x4"):
        masks.sample_masks(4, (4, 4))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="min_keep"):
        masks.sample_masks(16, (8, 8), min_keep=64)  # impossible: targets always cut something
    assert time.perf_counter() - start < 5


def test_a_mask_config_is_checked_once_and_a_bad_one_every_time():
    masks.check_config.cache_clear()
    for _ in range(3):
        masks.sample_masks(4, (8, 8), torch.Generator().manual_seed(0))
    assert masks.check_config.cache_info().misses == 1                   # the per-step path does not re-check
    for _ in range(2):
        with pytest.raises(ValueError, match="no target block fits a 4x4 patch grid"):
            masks.sample_masks(4, (4, 4))


def test_mask_to_indices_keeps_every_patch_and_flags_padding():
    drawn = masks.sample_masks(64, (8, 8), torch.Generator().manual_seed(0))
    idx, valid = masks.mask_to_indices(drawn.context, multiple=8)
    assert idx.shape[1] % 8 == 0 and idx.shape[1] >= drawn.context.sum(1).max()
    for row in range(64):
        assert torch.equal(idx[row][valid[row]], drawn.context[row].nonzero().flatten())
    assert valid.sum() == drawn.context.sum()  # no sample is cut to the batch minimum


# ============================================================================= model.py

def tiny_models(dim=32, depth=2, heads=2):
    torch.manual_seed(0)
    encoder = model.Encoder(patch_size=4, embed_dim=dim, depth=depth, num_heads=heads)
    predictor = model.Predictor(embed_dim=dim, pred_dim=16, depth=2, num_heads=2)
    return encoder, predictor


@pytest.mark.parametrize("name", list(model.PRESETS))
def test_shapes_for_every_preset(name, device):
    encoder = model.build_encoder(name, 32, 16).to(device)
    predictor = model.build_predictor(name).to(device)
    images = torch.randn(2, 3, 32, 32, device=device)
    d = encoder.embed_dim
    assert encoder(images).shape == (2, 4, d)
    keep = (torch.tensor([[0, 3, 0], [1, 2, 3]], device=device),
            torch.tensor([[True, True, False], [True, True, True]], device=device))
    context = encoder(images, *keep)
    assert context.shape == (2, 3, d)
    targets = (torch.tensor([[1], [2], [0], [3]], device=device),
               torch.ones(4, 1, dtype=torch.bool, device=device))                       # M = 2 blocks per sample
    assert predictor(context, *keep, *targets, (2, 2)).shape == (4, 1, d)


def test_encoder_parameter_counts_match_vit_ti_s_b():
    # published totals (timm vit_{tiny,small,base}_patch16_224), minus what our encoder has not:
    # the 1000-class head, the CLS token and 197 learned position embeddings
    published = {"tiny": 5_717_416, "small": 22_050_664, "base": 86_567_656}
    for name, total in published.items():
        d = model.PRESETS[name]["embed_dim"]
        reference = total - (d * 1000 + 1000) - d - 197 * d
        ours = model.count_params(model.build_encoder(name, 224, 16))
        assert abs(ours - reference) / reference < 0.01, (name, ours, reference)


@pytest.mark.parametrize("packed", [True, False])
def test_padding_never_changes_a_sample(packed, device, monkeypatch):
    """A sample's outputs are the same alone or in a batch with longer samples (no padding
    contamination), with the real tokens packed (CPU) and kept padded (a compiled GPU step). On CUDA
    the attention kernel may change with the length: a tolerance 10x wider, far below contamination."""
    monkeypatch.setattr(model, "packs_tokens", lambda device, compiled: packed)
    tol = dict(atol=1e-6, rtol=1e-5) if device.type == "cpu" else dict(atol=1e-5, rtol=1e-4)
    encoder, predictor = (m.to(device) for m in tiny_models())
    encoder.eval()
    images = torch.randn(3, 3, 16, 16).to(device)                        # 4x4 grid
    lengths = [5, 11, 16]
    keep = [torch.randperm(16, generator=torch.Generator().manual_seed(i))[:n].sort().values.to(device)
            for i, n in enumerate(lengths)]
    idx = torch.zeros(3, 16, dtype=torch.long, device=device)
    valid = torch.zeros(3, 16, dtype=torch.bool, device=device)
    for i, k in enumerate(keep):
        idx[i, :len(k)], valid[i, :len(k)] = k, True
    target_idx = torch.tensor([[2, 7, 0], [1, 4, 9], [3, 0, 0]], device=device)  # one block per sample, padded
    target_valid = torch.tensor([[True, True, False], [True, True, True], [True, False, False]], device=device)
    ones = functools.partial(torch.ones, dtype=torch.bool, device=device)
    batched = encoder(images, idx, valid)
    predicted = predictor(batched, idx, valid, target_idx, target_valid, (4, 4))
    # padding pointing elsewhere must not matter either
    idx_other = torch.where(valid, idx, 7)
    torch.testing.assert_close(encoder(images, idx_other, valid)[valid], batched[valid], **tol)
    for i, k in enumerate(keep):
        alone = encoder(images[i:i + 1], k[None], ones(1, len(k)))
        torch.testing.assert_close(alone[0], batched[i, :len(k)], **tol)
        t = int(target_valid[i].sum())
        alone_pred = predictor(alone, k[None], ones(1, len(k)), target_idx[i:i + 1, :t], ones(1, t), (4, 4))
        torch.testing.assert_close(alone_pred[0], predicted[i, :t], **tol)


def test_explicit_attention_is_sdpa_and_ignores_padded_keys():
    """model.explicit_attention, the CPU bf16 path, is softmax(Q K^T / sqrt(d)) V with padded keys
    masked: equal to torch's SDPA in fp32, blind to what padded keys and values hold, and, inside
    Attention under bf16 autocast, within bf16 error of the fp32 module."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, generator=g) for _ in range(3))
    key_valid = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    key_valid[0, ..., 5:] = False
    out = model.explicit_attention(q, k, v, key_valid)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid))
    torch.testing.assert_close(model.explicit_attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v))
    k_other, v_other = k.clone(), v.clone()
    k_other[0, :, 5:], v_other[0, :, 5:] = 100.0, -7.0
    torch.testing.assert_close(model.explicit_attention(q, k_other, v_other, key_valid), out)
    attention = model.Attention(48, 3)
    x, layout = torch.randn(2, 7, 48, generator=g), model.TokenLayout(None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention(x, layout)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), attention(x, layout), atol=2e-2, rtol=2e-2)


def test_compiled_encoder_packs_tokens_on_cpu_and_matches_eager(monkeypatch):
    """On the CPU a compiled encoder packs the real tokens too (model.packs_tokens), with the packed
    length as a dynamic size: outputs equal eager ones, zero at padding, for two different lengths."""
    encoder, _ = tiny_models()
    packed_lengths = []
    original = model.real_positions

    @torch.compiler.disable
    def counting_real_positions(valid):
        index = original(valid)
        packed_lengths.append(len(index))
        return index

    monkeypatch.setattr(model, "real_positions", counting_real_positions)
    compiled = torch.compile(encoder)
    images = torch.randn(2, 3, 16, 16)
    for lengths in ([5, 11], [9, 3]):
        idx = torch.arange(16).repeat(2, 1)[:, :11]
        valid = torch.arange(11)[None] < torch.tensor(lengths)[:, None]                   # (2, 11)
        packed_lengths.clear()
        out = compiled(images, idx, valid)
        assert packed_lengths == [sum(lengths)]                                      # packed inside the graph
        torch.testing.assert_close(out, encoder(images, idx, valid), atol=1e-5, rtol=1e-5)
        assert (out[~valid] == 0).all()
    assert model.packs_tokens(torch.device("cpu"), compiled=True)
    assert not model.packs_tokens(torch.device("cuda"), compiled=True)


def test_init_is_applied_once_and_never_redone():
    cfg = train.resolve(train.Config(model="tiny", depth=4))
    context_encoder, predictor, target_encoder = train.build_models(cfg)
    # residual projections of block l are scaled by 1/sqrt(2(l+1)) exactly once (twice would square it)
    for layer, block in enumerate(context_encoder.blocks):
        expected = 0.02 / math.sqrt(2 * (layer + 1))  # trunc_normal_'s cut is at +-2 absolute, i.e. 100 std
        assert abs(block.attn.proj.weight.std().item() / expected - 1) < 0.05
    # nothing in the training setup touches the weights after construction
    torch.manual_seed(cfg.seed)
    fresh = model.build_encoder("tiny", cfg.img_size, cfg.patch_size, depth=4)
    train.build_optimizer(cfg, context_encoder, predictor)
    for a, b, c in zip(fresh.state_dict().values(), context_encoder.state_dict().values(),
                       target_encoder.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_encoder_runs_at_another_resolution_and_rejects_bad_sizes():
    encoder, _ = tiny_models()
    assert encoder(torch.randn(1, 3, 24, 32)).shape == (1, 6 * 8, 32)
    with pytest.raises(ValueError, match="not divisible"):
        encoder(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="not divisible"):
        model.build_encoder("nano", 30, 4)


def trained_like_(encoder, seed):
    """Weights at the scale training reaches rather than init's std 0.02: linear maps of unit gain
    (std 1/sqrt(fan_in)), norm gains spread around 1, biases around 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * p[0].numel() ** -0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return encoder


def test_bf16_autocast_keeps_the_residual_stream_in_fp32():
    """Under bf16 autocast only the matmuls inside the blocks run in bf16 (as in ViT and I-JEPA): a
    block's input is fp32, and a 12-layer ViT-S-width encoder stays within 0.5 % of its fp32 output
    at init and within 0.8 % with trained-scale weights (relative norm of the difference;
    docs/performance.md has the margins)."""
    torch.manual_seed(0)
    encoder = model.Encoder(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    images = torch.randn(4, 3, 64, 64)
    seen = []
    for block in encoder.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    for weights, tolerance in (("init", 5e-3), ("trained scale", 8e-3)):
        if weights == "trained scale":
            trained_like_(encoder, seed=0)
        with torch.no_grad():
            full = encoder(images)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = encoder(images)
        assert (low.float() - full).norm() / full.norm() < tolerance, weights
    assert seen == [torch.float32] * 48                   # 12 blocks, fp32 and bf16 runs, both weights


def test_analytic_flops_match_torch_flop_counter():
    import bench
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    encoder, predictor = tiny_models()
    images = torch.randn(2, 3, 32, 32)
    idx, valid = torch.arange(40).repeat(2, 1), torch.ones(2, 40, dtype=torch.bool)
    # the math backend decomposes attention into matmuls the counter sees (the fused CPU kernel it skips)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        encoder(images, idx, valid)
    assert counter.get_total_flops() == 2 * (bench.encoder_flops(encoder, 40)
                                            + bench.patch_embed_flops(encoder, 64))
    context = torch.randn(2, 40, 32)
    t_idx, t_valid = torch.arange(10).repeat(8, 1), torch.ones(8, 10, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        predictor(context, idx, valid, t_idx, t_valid, (8, 8))
    assert counter.get_total_flops() == 2 * bench.predictor_flops(predictor, 40, 10, 32, num_blocks=4)


def test_packed_tokens_spend_flops_on_padding_only_in_attention():
    """bench.analytic_step_flops' `executed` count equals torch's FLOP counter on one eager step with
    real, unevenly padded masks (forward + backward of context encoder and predictor, target forward),
    and padding costs far less than computing every padded token would."""
    import bench
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = train.resolve(train.Config(model="nano", img_size=32, patch_size=4, batch_size=8))
    encoder, predictor, target_encoder = train.build_models(cfg)
    step_masks = train.sample_step_masks(cfg, 0, (8, 8), 0, 1, torch.device("cpu"))
    context_idx, context_valid, target_idx, target_valid = step_masks
    assert not context_valid.all()                       # uneven contexts: there is padding to skip
    images = torch.randn(8, 3, 32, 32)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        with torch.no_grad():
            target_encoder(images)
        context = encoder(images, context_idx, context_valid)
        predictor(context, context_idx, context_valid, target_idx, target_valid, (8, 8)).sum().backward()
    counted = bench.analytic_step_flops(encoder, predictor, step_masks, 64, packed=True)
    assert counted["executed"] * 8 == pytest.approx(counter.get_total_flops(), rel=1e-9)
    dense = bench.analytic_step_flops(encoder, predictor, step_masks, 64, packed=False)
    assert counted["useful"] < counted["executed"] < dense["executed"]
    assert counted["padding_share"] < 0.5 * dense["padding_share"]


def test_bench_times_its_functions_in_turn():
    """Every ratio bench.py reports (MFU, ours / official) rests on timing the functions one call of
    each in turn, so that load on a shared host slows them alike; medians skip the warmup calls."""
    import bench
    calls = []
    fns = [lambda i, name=name: calls.append((name, i)) or f"{name}{i}" for name in ("step", "gemm")]
    timed = bench.time_in_turn(fns, bench.WARMUP_STEPS + 3, torch.device("cpu"))
    assert calls == [(name, i) for i in range(bench.WARMUP_STEPS + 3) for name in ("step", "gemm")]
    for (median_s, times, results), name in zip(timed, ("step", "gemm")):
        assert results == [f"{name}{i}" for i in range(bench.WARMUP_STEPS + 3)] and len(times) == len(results)
        assert median_s == sorted(times[bench.WARMUP_STEPS:])[1]


def test_slow_cpu_bf16_agrees_with_a_larger_matmul():
    """runs.slow_cpu_bf16 names a CPU whose bf16 matmuls are slow (no AVX-512: a generic kernel) and
    stays silent on one with AVX-512: its verdict matches 512 x 512 products timed here by
    torch.utils.benchmark (one thread, as a neighbour's load distorts multi-threaded timings)."""
    from torch.utils.benchmark import Timer
    def median_seconds(dtype):
        timer = Timer("a @ a", globals={"a": torch.randn(512, 512).to(dtype)}, num_threads=1)
        return timer.blocked_autorange(min_run_time=0.05).median
    threads = torch.get_num_threads()
    slowdown = median_seconds(torch.bfloat16) / median_seconds(torch.float32)
    problem = runs.slow_cpu_bf16()
    assert torch.get_num_threads() == threads
    if slowdown > 20:                                             # AVX2 only: 30-60x
        assert problem is not None and problem.startswith("bf16 matmuls run") and "slower than fp32" in problem
    if slowdown < 5:                                              # AVX-512: faster than fp32 or a few times slower
        assert problem is None


def test_bench_refuses_bf16_where_it_is_slow_and_skips_it_by_default(monkeypatch, capsys):
    """On a CPU without fast bf16 a bf16 step takes minutes: an explicit --precision bf16 gets a
    one-line error before anything is measured; the default measures fp32 alone and says why."""
    import bench
    monkeypatch.setattr(runs, "slow_cpu_bf16", lambda: "bf16 matmuls run 400x slower than fp32 on this CPU")
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cpu", "--precision", "fp32,bf16"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("bench.py: error: --precision fp32,bf16: bf16 matmuls run 400x slower")
    assert err.endswith("use --precision fp32 or leave it out")
    measured = []
    class AllStepsMeasured(Exception):
        pass
    def first_table_row(*args):
        raise AllStepsMeasured                                    # tables come after every step is measured
    monkeypatch.setattr(bench, "bench_step", lambda cfg, steps: measured.append((cfg.precision, cfg.compile)) or {})
    monkeypatch.setattr(bench, "label", first_table_row)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cpu"])
    with pytest.raises(AllStepsMeasured):
        bench.main()
    assert measured == [("fp32", False), ("fp32", True)]
    assert "bf16 skipped: bf16 matmuls run 400x slower" in capsys.readouterr().out


# ============================================================================= losses.py

def test_sigreg_is_at_its_floor_for_gaussians_1_at_collapse_and_larger_otherwise():
    values = [losses.sigreg(torch.randn(512, 32, generator=torch.Generator().manual_seed(s)),
                            generator=torch.Generator().manual_seed(100 + s)).item() for s in range(40)]
    t, omega = losses.epps_pulley_grid()
    phi = torch.exp(-t ** 2 / 2)
    # E|phi_S - phi|^2 = (1 - phi^2) / S for S independent samples, in units of the collapse value
    floor = ((1 - phi ** 2) * omega).sum().item() / ((1 - phi) ** 2 * omega).sum().item() / 512
    assert abs(floor * 512 - 2.62) < 0.01 and abs(sum(values) / len(values) - floor) < 0.1 * floor
    assert losses.sigreg(torch.zeros(512, 32), num_slices=8).item() == pytest.approx(1.0)   # all at the origin
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 32, generator=g)
    rank8 = torch.randn(512, 8, generator=g) @ torch.randn(8, 32, generator=g) / 8 ** 0.5
    for bad in (3 * z, z + 1, rank8, torch.ones(512, 32)):
        assert losses.sigreg(bad, generator=torch.Generator().manual_seed(5)) > 10 * floor


def test_sigreg_and_its_gradient_per_sample_do_not_grow_with_the_sample_count():
    """One lambda for every batch and resolution: for the same non-Gaussian distribution, SIGReg's
    value and its gradient with respect to a parameter of that distribution are the same at S = 512
    and S = 8192 samples, as the prediction loss's are (both are means). With LeJEPA's factor S the
    value and gradient would grow 16-fold."""
    results = []
    for samples in (512, 8192):
        scale = torch.tensor(1.5, requires_grad=True)
        z = torch.randn(samples, 16, generator=torch.Generator().manual_seed(samples)) * scale
        value = losses.sigreg(z, generator=torch.Generator().manual_seed(3))
        value.backward()
        results.append((value.item(), scale.grad.item()))
    (small_value, small_grad), (large_value, large_grad) = results
    assert large_value == pytest.approx(small_value, rel=0.1) and large_grad == pytest.approx(small_grad, rel=0.1)


def slow_sigreg(z, directions):
    """The formula written as loops, with complex numbers and torch.trapezoid over [-3, 3]."""
    t = torch.linspace(-3, 3, 33, dtype=torch.float64)
    values = []
    for m in range(directions.shape[1]):
        x = (z.double() @ directions[:, m].double())
        ecf = torch.stack([torch.exp(1j * tj * x).mean() for tj in t])
        integrand = (ecf - torch.exp(-t ** 2 / 2)).abs() ** 2 * torch.exp(-t ** 2 / 2)
        values.append(torch.trapezoid(integrand, t))
    collapse = torch.trapezoid((1 - torch.exp(-t ** 2 / 2)) ** 2 * torch.exp(-t ** 2 / 2), t)
    return torch.stack(values).mean() / collapse


def test_sigreg_equals_a_slow_loop_and_ignores_sample_order(device):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 8, generator=g) * 1.3 + 0.2
    directions = torch.randn(8, 5, generator=g)
    directions = directions / directions.norm(dim=0)
    fast = losses.sigreg(z.to(device), directions=directions.to(device))
    torch.testing.assert_close(fast.double().cpu(), slow_sigreg(z, directions), rtol=1e-4, atol=1e-4)
    shuffled = z[torch.randperm(200, generator=g)].to(device)
    torch.testing.assert_close(losses.sigreg(shuffled, directions=directions.to(device)), fast, rtol=1e-5, atol=1e-6)


def test_sigreg_gradients_are_right_eager_and_compiled():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(12, 3, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    t, _ = losses.epps_pulley_grid()
    assert torch.autograd.gradcheck(losses._WaveSums.apply, (x, t.double()))
    # the fast eager path computes what the plain wave_sums computes, value and gradient
    plain_x = x.detach().clone().requires_grad_(True)
    fast, plain = losses._WaveSums.apply(x, t.double()), losses.wave_sums(plain_x, t.double())
    torch.testing.assert_close(fast, plain)
    weights = torch.randn(plain.shape, generator=g, dtype=torch.float64)
    (fast * weights).sum().backward()
    (plain * weights).sum().backward()
    torch.testing.assert_close(x.grad, plain_x.grad)
    # and the whole statistic's gradient equals autograd's through the formula written plainly
    z = (torch.randn(40, 6, generator=g) * 1.3).requires_grad_(True)
    directions = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=0)
    losses.sigreg(z, directions=directions).backward()
    z64 = z.detach().double().requires_grad_(True)
    xt = (z64 @ directions.double())[:, :, None] * t.double()                       # (S, M, J)
    error = (xt.cos().mean(0) - torch.exp(-t.double() ** 2 / 2)) ** 2 + xt.sin().mean(0) ** 2
    omega = losses.epps_pulley_grid()[1].double()
    collapse = ((1 - torch.exp(-t.double() ** 2 / 2)) ** 2 * omega).sum()
    ((error * omega).sum(1).mean() / collapse).backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)
    # under torch.compile sigreg takes the plain expression, never _WaveSums: same value, same gradient
    eager_grad, z.grad = z.grad, None

    graphs, inductor = [], torch._dynamo.lookup_backend("inductor")

    def recording_inductor(graph_module, example_inputs):
        graphs.append(graph_module.graph)
        return inductor(graph_module, example_inputs)

    value = torch.compile(losses.sigreg, backend=recording_inductor)(z, directions=directions)
    value.backward()
    # the cosines are a node of a compiled graph (not hidden in _WaveSums, nor run eagerly after a fallback)
    assert any(node.target in ("cos", torch.cos) for graph in graphs for node in graph.nodes)
    torch.testing.assert_close(value, losses.sigreg(z, directions=directions))
    torch.testing.assert_close(z.grad, eager_grad)


def test_sigreg_rejects_non_finite_input():
    z = torch.randn(16, 4)
    z[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        losses.sigreg(z)


def test_the_loss_compiles_to_one_graph_given_its_directions():
    """With the slices drawn outside (train.forward_loss does), torch.compile sees jepa_loss whole:
    no graph break from a seeded CPU generator or from the eager-only NaN check, no host sync."""
    generator = torch.Generator().manual_seed(0)
    predictions, targets = torch.randn(8, 5, 16), torch.randn(8, 5, 16)
    valid = torch.rand(8, 5, generator=generator) > 0.3
    embeddings = torch.randn(40, 16, requires_grad=True)
    directions = losses.slice_directions(16, 32, generator)
    explained = torch._dynamo.explain(losses.jepa_loss)(predictions, targets, valid, embeddings, 0.05,
                                                          directions=directions)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def _sigreg_rank(rank, world, path, z_all, directions, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    # eager, then traced by torch.compile (aot_eager: dynamo and AOT autograd without inductor's
    # compile time), which takes sigreg's plain branch and must carry the all-reduce through it too
    for mode, sigreg in (("eager", losses.sigreg), ("compiled", torch.compile(losses.sigreg, backend="aot_eager"))):
        z = z_all.chunk(world)[rank].clone().requires_grad_(True)
        value = sigreg(z, directions=directions)
        value.backward()
        queue.put((rank, mode, value.item(), z.grad.tolist()))  # plain lists outlive the process
    dist.destroy_process_group()


def test_sigreg_under_two_processes_equals_one_process_on_the_whole_batch_eager_and_compiled(tmp_path):
    import torch.multiprocessing as mp
    g = torch.Generator().manual_seed(0)
    z_all = torch.randn(64, 6, generator=g) * 1.5
    directions = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=0)
    z = z_all.clone().requires_grad_(True)
    single = losses.sigreg(z, directions=directions)
    single.backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sigreg_rank, args=(r, 2, tmp_path / "store", z_all, directions, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in range(2 * len(procs)))
    for p in procs:
        p.join(30)
    assert [(rank, mode) for rank, mode, _, _ in results] == [(0, "compiled"), (0, "eager"), (1, "compiled"), (1, "eager")]
    for rank, mode, value, grad in results:
        assert abs(value - single.item()) < 1e-4
        # DDP divides the summed gradients by the world size: that average must be the 1-process gradient
        torch.testing.assert_close(torch.tensor(grad) / 2, z.grad.chunk(2)[rank], rtol=1e-4, atol=1e-7)


def test_prediction_loss_ignores_padding_and_jepa_loss_mixes_with_one_lambda(device):
    predictions, targets = torch.randn(4, 5, 8).to(device), torch.randn(4, 5, 8).to(device)
    valid = torch.rand(4, 5).to(device) > 0.4
    valid[0, 0] = True
    # padded slots holding inf and NaN change neither the loss nor the real tokens' gradients
    poisoned = torch.where(valid[..., None], predictions, torch.full_like(predictions, float("inf")))
    poisoned[..., 0] = torch.where(valid, poisoned[..., 0], float("nan"))
    poisoned.requires_grad_(True)
    l2 = losses.prediction_loss(poisoned, targets, valid)
    expected = ((predictions - targets) ** 2).mean(-1)[valid].mean()
    torch.testing.assert_close(l2, expected)
    l2.backward()
    grad = 2 * (predictions - targets) / (8 * valid.sum())
    torch.testing.assert_close(poisoned.grad, torch.where(valid[..., None], grad, 0.0))
    embeddings = torch.randn(64, 8).to(device)
    loss, l2_part, reg = losses.jepa_loss(predictions, targets, valid, embeddings, lam=0.3,
                                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, 0.7 * l2_part + 0.3 * reg)


# ============================================================================= data.py

def _save(img: Image.Image, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


def _noise_rgb(seed: int, size=(20, 14)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---- synthetic ----

def test_synthetic_is_deterministic_per_index_and_split():
    first = data.build_dataset("synthetic", None, "train", 32, augment=False)
    again = data.build_dataset("synthetic", None, "train", 32, augment=False)
    val = data.build_dataset("synthetic", None, "val", 32, augment=False)
    assert torch.equal(first[5][0], again[5][0])
    assert not torch.equal(first[5][0], first[15][0])  # same class, different image
    assert not torch.equal(first[5][0], val[5][0])
    assert (len(first), len(val)) == (20_000, 4_000)


@pytest.mark.parametrize("img_size,augment", [(32, False), (32, True), (48, False), (48, True)])
def test_synthetic_items_shapes_and_labels(img_size, augment):
    dataset = data.build_dataset("synthetic", None, "train", img_size, augment)
    items = [dataset[i] for i in range(30)]
    for image, label, skipped in items:
        assert image.shape == (3, img_size, img_size) and image.dtype == torch.uint8
        assert isinstance(label, int) and skipped == 0
    assert sorted({label for _, label, _ in items}) == list(range(10))
    assert dataset.num_classes == len(dataset.classes) == 10


def test_synthetic_augmentation_follows_torch_seed():
    dataset = data.build_dataset("synthetic", None, "train", 32, augment=True)
    torch.manual_seed(0)
    first = dataset[3][0]
    torch.manual_seed(0)
    assert torch.equal(first, dataset[3][0])
    assert not torch.equal(first, dataset[3][0])


def test_synthetic_mean_colour_does_not_reveal_class():
    dataset = data.build_dataset("synthetic", None, "train", 32, augment=False)
    means = torch.stack([dataset[i][0].float().mean((1, 2)) for i in range(600)])
    labels = torch.arange(600) % 10
    centroids = torch.stack([means[:400][labels[:400] == c].mean(0) for c in range(10)])
    predicted = torch.cdist(means[400:], centroids).argmin(1)
    assert (predicted == labels[400:]).float().mean() < 0.25


# ---- image folders with broken and unusual files ----

def _messy_folder(root):
    """root/train/{a,b,empty}, root/val/a; returns (paths of good files, paths of bad files)."""
    train = root / "train"
    good = []
    for i in range(3):
        _save(_noise_rgb(i), train / "a" / f"good_{i}.jpg")
        good.append(train / "a" / f"good_{i}.jpg")
    bad = [train / "a" / "bad_text.jpg", train / "a" / "bad_truncated.jpg", train / "a" / "bad_zero.jpg",
           train / "b" / "zz_bad_zero.png"]  # the last file of all: the replacement wraps to index 0
    bad[0].write_text("this is not an image")
    jpeg = io.BytesIO()
    _noise_rgb(9, (64, 64)).save(jpeg, "JPEG")
    bad[1].write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    bad[2].write_bytes(b"")
    rgba = Image.new("RGBA", (9, 7), (255, 0, 0, 128))
    gray16 = Image.fromarray(np.full((6, 8), 40000, np.uint16))
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    palette = _noise_rgb(3).convert("P", palette=Image.ADAPTIVE, colors=8)
    specials = {"rgba.png": rgba, "gray16.png": gray16, "gray.png": _noise_rgb(4).convert("L"),
                "cmyk.jpg": cmyk, "palette.png": palette, "tiny.png": Image.new("RGB", (1, 1), (1, 2, 3))}
    for name, img in specials.items():
        _save(img, train / "b" / name)
        good.append(train / "b" / name)
    bad[3].write_bytes(b"")
    (train / "empty").mkdir()
    (train / "empty" / "notes.txt").write_text("not an image")
    (train / "a" / "readme.md").write_text("ignored: not an image extension")
    _save(_noise_rgb(7), root / "val" / "a" / "v.jpg")
    return [str(p) for p in good], [str(p) for p in bad]


def _expected(path, img_size):
    img = data.decode_image(path, round(img_size / 0.875))
    return data._to_tensor(data.center_crop(img, img_size, round(img_size / 0.875)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_image_folder_survives_bad_files(tmp_path, num_workers, capfd):
    """Unreadable files are replaced by the next readable one; the warnings are our own lines on stderr,
    once per file and process, not Python warnings that name data.py's file and line."""
    good, bad = _messy_folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = data.build_dataset(str(tmp_path), None, "train", 16, augment=False)
        assert dataset.classes == ["a", "b"]  # the empty class folder is ignored
        assert len(dataset) == len(good) + len(bad)
        loader = DataLoader(dataset, batch_size=4, num_workers=num_workers)
        for _ in range(2):
            images, skipped = [], 0
            for batch, labels, batch_skipped in loader:
                assert batch.shape[1:] == (3, 16, 16) and batch.dtype == torch.uint8
                images += [image for image in batch]
                skipped += int(batch_skipped.sum())
            assert skipped == len(bad)
            for path in good:
                assert any(torch.equal(_expected(path, 16), image) for image in images), path
    assert not caught
    messages = capfd.readouterr().err.splitlines()
    assert all(m.startswith("warning: ") for m in messages) and not any("data.py" in m for m in messages)
    assert sum("without images" in m and "empty" in m for m in messages) == 1
    if num_workers == 0:  # worker processes are new each epoch, and warn again
        for path in bad:
            assert sum(path in m for m in messages) == 1, path


def test_modes_convert_to_sensible_rgb(tmp_path):
    good, _ = _messy_folder(tmp_path)
    pixel = {os.path.basename(p): np.array(data.decode_image(p, 1))[0, 0] for p in good}
    assert abs(pixel["rgba.png"] - [128, 0, 0]).max() <= 1  # half-transparent red on black
    assert list(pixel["gray16.png"]) == [156] * 3  # 40000 / 256
    assert pixel["cmyk.jpg"][0] > 200 and pixel["cmyk.jpg"][1:].max() < 60
    assert list(pixel["tiny.png"]) == [1, 2, 3]
    palette_path = [p for p in good if p.endswith("palette.png")][0]
    palette = Image.open(palette_path).convert("RGB")
    assert np.array_equal(np.array(data.decode_image(palette_path, 1)), np.array(palette))


def test_decompression_bomb_is_skipped(tmp_path, monkeypatch, capsys):
    _save(_noise_rgb(0, (64, 64)), tmp_path / "c" / "big.png")
    _save(_noise_rgb(1, (8, 8)), tmp_path / "c" / "small.png")
    dataset = data.build_dataset(str(tmp_path), None, "train", 8, augment=False)
    small = _expected(str(tmp_path / "c" / "small.png"), 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 pixels: Pillow only warns
    image, _, skipped = dataset[0]
    assert skipped == 1 and torch.equal(image, small) and "big.png" in capsys.readouterr().err
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit: Pillow raises
    image, _, skipped = dataset[0]
    assert skipped == 1 and torch.equal(image, small)


def test_too_many_unreadable_files_raise(tmp_path, monkeypatch):
    for i in range(5):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"{i}.jpg").write_bytes(b"")
    monkeypatch.setattr(data, "MAX_CONSECUTIVE_FAILURES", 3)
    dataset = data.build_dataset(str(tmp_path), None, "train", 8, augment=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(data.DataError, match="too many unreadable"):
            dataset[0]


def test_folder_without_split_holds_out_every_tenth_image(tmp_path):
    for i in range(20):
        _save(_noise_rgb(i, (4, 4)), tmp_path / "c" / f"{i:02d}.png")
    train = data.build_dataset(str(tmp_path), None, "train", 4, augment=True)
    val = data.build_dataset(str(tmp_path), None, "val", 4, augment=False)
    assert [os.path.basename(p) for p, _ in val.samples] == ["09.png", "19.png"]
    assert len(train) == 18 and train[0][0].shape == (3, 4, 4)


def test_folder_with_splits_labels_val_by_the_train_classes_and_warns_about_others(tmp_path, capsys):
    for split, name in [("train", "b"), ("train", "a"), ("val", "b"), ("val", "zz")]:
        _save(_noise_rgb(len(name), (4, 4)), tmp_path / split / name / "0.png")
    val = data.build_dataset(str(tmp_path), None, "val", 4, augment=False)
    assert "train/ does not have" in capsys.readouterr().err
    assert val.classes == ["a", "b"] and [label for _, label in val.samples] == [1]


def test_user_errors_are_data_errors(tmp_path):
    with pytest.raises(data.DataError, match="unknown --data 'imagenet'"):
        data.build_dataset("imagenet", None, "train", 32, False)
    with pytest.raises(data.DataError, match="does not exist"):
        data.build_dataset(str(tmp_path / "missing"), None, "train", 32, False)
    (tmp_path / "no_classes").mkdir()
    with pytest.raises(data.DataError, match="no class folders"):
        data.build_dataset(str(tmp_path / "no_classes"), None, "train", 32, False)
    with pytest.raises(data.DataError, match="unknown split"):
        data.build_dataset("synthetic", None, "test", 32, False)


# ---- cifar10 ----

def _fake_cifar_batches(count=4):
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        pixels = np.zeros((count, 3, 32, 32), np.uint8)
        pixels[:, 0] = (np.arange(1024) % 256).reshape(32, 32)  # red varies along rows and columns
        pixels[:, 1], pixels[:, 2] = 20 + i, 30
        batches[name] = pickle.dumps({b"data": pixels.reshape(count, -1), b"labels": [i, 9, 0, 1][:count]})
    return batches


def _check_cifar(dataset, split):
    assert len(dataset) == (20 if split == "train" else 4) and dataset.num_classes == 10
    image, label, skipped = dataset[0]
    assert image.shape == (3, 32, 32) and skipped == 0
    assert torch.equal(image[0], torch.from_numpy((np.arange(1024) % 256).reshape(32, 32).astype(np.uint8)))
    assert int(image[1, 0, 0]) == (20 if split == "train" else 25) and label == (0 if split == "train" else 5)


def test_cifar10_from_archive_and_extracted_folder(tmp_path):
    archive_path = tmp_path / "dl" / "cifar-10-python.tar.gz"
    archive_path.parent.mkdir()
    with tarfile.open(archive_path, "w:gz") as archive:
        for name, blob in _fake_cifar_batches().items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    extracted = tmp_path / "ex" / "cifar-10-batches-py"
    extracted.mkdir(parents=True)
    for name, blob in _fake_cifar_batches().items():
        (extracted / name).write_bytes(blob)
    for location in (archive_path, archive_path.parent, extracted, extracted.parent):
        for split in ("train", "val"):
            _check_cifar(data.build_dataset("cifar10", str(location), split, 32, augment=False), split)
    big = data.build_dataset("cifar10", str(extracted), "train", 48, augment=True)
    assert big[0][0].shape == (3, 48, 48)


def test_cifar10_from_image_folder_and_search_path(tmp_path, monkeypatch):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            _save(_noise_rgb(len(name), (32, 32)), tmp_path / "data" / "cifar10" / split / name / "x.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    val = data.build_dataset("cifar10", None, "val", 32, augment=False)
    assert val.classes == ["cat", "dog"] and len(val) == 2
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(data.DataError, match="CIFAR10_DIR"):
        data.build_dataset("cifar10", None, "train", 32, augment=False)


# ---- imagenet100 ----

def test_imagenet100_reports_missing_classes(tmp_path, monkeypatch):
    assert len(set(data.IMAGENET100_WNIDS)) == 100
    for wnid in data.IMAGENET100_WNIDS[:3] + ("n01440764",):
        (tmp_path / "train" / wnid).mkdir(parents=True)
    with pytest.raises(data.DataError, match="found 3 of 100") as error:
        data.build_dataset("imagenet100", str(tmp_path), "train", 32, augment=False)
    assert "IMAGENET_DIR" in str(error.value) and "--data-dir" in str(error.value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    with pytest.raises(data.DataError, match="found 0 of 100"):
        data.build_dataset("imagenet100", None, "val", 32, augment=False)


def test_imagenet100_selects_the_100_classes(tmp_path):
    tiny = Image.new("RGB", (5, 3), (9, 9, 9))
    for wnid in data.IMAGENET100_WNIDS + ("n01440764",):  # plus one ImageNet-1k class to leave out
        _save(tiny, tmp_path / "val" / wnid / "x.JPEG")
    dataset = data.build_dataset("imagenet100", str(tmp_path), "val", 8, augment=False)
    assert dataset.classes == sorted(data.IMAGENET100_WNIDS) and len(dataset) == 100
    assert dataset[99][0].shape == (3, 8, 8)


# ---- device-side helpers and cache ----

def test_normalize_matches_manual_computation(device):
    images = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8).to(device)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (data.MEAN, data.STD))
    manual = (images.float() / 255 - mean) / std
    out = data.normalize(images)
    assert out.dtype == torch.float32 and torch.allclose(out, manual, atol=1e-5)


def test_random_resized_crop_flip(device):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8).to(device)
    out = data.random_resized_crop_flip(images, 12)
    assert out.shape == (64, 3, 12, 12) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 255
    whole = data.random_resized_crop_flip(images, 16, scale=(1, 1), ratio=(1, 1))
    flipped = [torch.allclose(w, i.flip(-1), atol=1e-3) for i, w in zip(images.float(), whole)]
    kept = [torch.allclose(w, i, atol=1e-3) for i, w in zip(images.float(), whole)]
    assert all(f or k for f, k in zip(flipped, kept))  # the full box reproduces the input, maybe mirrored
    assert 0 < sum(flipped) < 64


def test_device_crop_boxes_follow_random_resized_crop(device):
    """Boxes that do not fit are redrawn, not clamped (clamping shrinks their area and squares
    them): every box keeps an area in `scale` and an aspect in `ratio`, and lies inside the image;
    the mean area matches the JPEG path's `_random_crop_box` on a large square image."""
    generator = torch.Generator(device).manual_seed(0)
    width, height, centre_x, centre_y = data.crop_boxes(200_000, (0.3, 1.0), (3 / 4, 4 / 3), device, generator)
    area, aspect = width * height, width / height
    assert area.min() >= 0.3 - 1e-6 and area.max() <= 1 + 1e-6
    assert aspect.min() >= 3 / 4 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5
    assert ((centre_x.abs() <= 1 - width + 1e-6) & (centre_y.abs() <= 1 - height + 1e-6)).all()
    torch.manual_seed(0)
    jpeg_areas = [(lambda box: (box[2] - box[0]) * (box[3] - box[1]) / 1000 ** 2)(data._random_crop_box(1000, 1000))
                  for _ in range(20_000)]
    assert abs(area.mean().item() - np.mean(jpeg_areas)) < 0.01   # about 0.59; clamped boxes averaged 0.64


def test_cache_round_trip(tmp_path):
    good, bad = _messy_folder(tmp_path / "images")
    path = str(tmp_path / "cache.npy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = data.build_dataset(str(tmp_path / "images"), None, "train", 16, augment=False)
        cache = data.build_cache(dataset, path, 12)
    assert cache.shape == (len(dataset), 12, 12, 3)
    assert sorted(os.listdir(tmp_path)) == ["cache.npy", "cache.npy.labels.npy", "images"]
    cached = data.CachedDataset(path, dataset.classes)
    for index, (file, label) in enumerate(dataset.samples):
        image, cached_label, skipped = cached[index]
        assert image.shape == (3, 12, 12) and skipped == 0
        if file in good:
            direct = np.array(data.center_crop(data.decode_image(file, 12), 12, 12))
            assert np.array_equal(image.permute(1, 2, 0).numpy(), direct) and cached_label == label
    modified = os.path.getmtime(path)
    assert data.build_cache(dataset, path, 12).shape == cache.shape and os.path.getmtime(path) == modified


def test_an_interrupted_cache_leaves_no_file_behind(tmp_path, monkeypatch):
    """Ctrl-C while the cache is decoded: neither the half-written array (gigabytes for ImageNet) nor
    anything that looks like a complete cache stays."""
    dataset = data.build_dataset("synthetic", None, "train", 16, augment=False)
    real_loader = data.DataLoader

    def interrupted_after_one_batch(*args, **kwargs):
        yield next(iter(real_loader(*args, **{**kwargs, "num_workers": 0})))
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "DataLoader", interrupted_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        data.build_cache(dataset, str(tmp_path / "cache.npy"), 12)
    assert os.listdir(tmp_path) == []


# ============================================================================= eval_probe.py

def test_topk_accuracy_counts_label_among_k_best():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    labels = torch.tensor([2, 0])
    assert eval_probe.topk_accuracy(scores, labels, 1) == 0.5   # row 0 predicts 1, row 1 predicts 0
    assert eval_probe.topk_accuracy(scores, labels, 2) == 1.0


def test_linear_probe_separates_linearly_separable_classes():
    generator = torch.Generator().manual_seed(0)
    num_classes, dim = 4, 16
    directions = torch.eye(dim)[:num_classes] * 3
    train_y = torch.arange(400) % num_classes
    val_y = torch.arange(200) % num_classes
    train_x = directions[train_y] + 0.3 * torch.randn(400, dim, generator=generator)
    val_x = directions[val_y] + 0.3 * torch.randn(200, dim, generator=generator)
    result = eval_probe.linear_probe(train_x, train_y, val_x, val_y, num_classes, epochs=50)
    assert result["top1"] == 1.0
    assert result["best_weight_decay"] in result["heldout_top1"]
    assert "top5" not in result  # only reported for more than 10 classes


def test_linear_probe_stays_at_chance_on_random_labels():
    generator = torch.Generator().manual_seed(0)
    num_classes = 20
    train_x, val_x = torch.randn(1000, 32, generator=generator), torch.randn(1000, 32, generator=generator)
    train_y = torch.randint(0, num_classes, (1000,), generator=generator)
    val_y = torch.randint(0, num_classes, (1000,), generator=generator)
    result = eval_probe.linear_probe(train_x, train_y, val_x, val_y, num_classes, epochs=50)
    assert result["top1"] < 1 / num_classes + 0.1
    assert result["top5"] < 5 / num_classes + 0.1


def test_knn_weighted_vote_matches_hand_computation():
    # Cosine similarities to the query (1, 0): 1 (class 0), 0.6 and 0.6 (class 1), -1 (class 0).
    train_x = torch.tensor([[2.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[5.0, 0.0]])  # unnormalised on purpose
    scores = eval_probe.knn_classify(train_x, train_y, query, num_classes=3, k=3, temperature=0.5)
    expected = torch.tensor([[math.exp(1 / 0.5), 2 * math.exp(0.6 / 0.5), 0.0]])
    torch.testing.assert_close(scores, expected)
    # A plain majority of the 3 neighbours says class 1; the weighted vote, sharper, says 0.
    scores = eval_probe.knn_classify(train_x, train_y, query, num_classes=3, k=3, temperature=0.07)
    assert scores.argmax().item() == 0
    # k larger than the train set uses all of it, including the far point of class 0.
    scores = eval_probe.knn_classify(train_x, train_y, query, num_classes=3, k=10, temperature=1.0)
    torch.testing.assert_close(scores[0, 0], torch.tensor(math.exp(1) + math.exp(-1)))


def test_knn_chunks_give_the_same_scores():
    generator = torch.Generator().manual_seed(0)
    train_x, query = torch.randn(50, 8, generator=generator), torch.randn(30, 8, generator=generator)
    train_y = torch.randint(0, 5, (50,), generator=generator)
    whole = eval_probe.knn_classify(train_x, train_y, query, 5, k=7)
    chunked = eval_probe.knn_classify(train_x, train_y, query, 5, k=7, chunk_size=4)
    torch.testing.assert_close(whole, chunked)


class RecordingEncoder(nn.Module):
    """Stand-in encoder: records its mode and grad state; dropout would make train mode random."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.dropout = nn.Dropout(0.5)
        self.calls = []

    def forward(self, images):
        self.calls.append((self.training, torch.is_grad_enabled()))
        patches = images.flatten(2).transpose(1, 2)                 # (B, N, 3)
        return self.dropout(self.proj(patches))                     # (B, N, 8)


def test_extract_features_is_frozen_eval_mode_and_mean_pooled():
    encoder = RecordingEncoder().train()
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(10)
    loader = [(images[:6], labels[:6], torch.zeros(6)), (images[6:], labels[6:], torch.zeros(4))]
    features, got_labels = eval_probe.extract_features(encoder, loader, torch.device("cpu"))
    assert encoder.calls == [(False, False), (False, False)]
    assert features.shape == (10, 8) and features.dtype == torch.float32 and not features.requires_grad
    assert torch.equal(got_labels, labels) and got_labels.dtype == torch.long
    again, _ = eval_probe.extract_features(encoder, loader, torch.device("cpu"))
    assert torch.equal(features, again)  # dropout is off
    expected = encoder.proj(eval_probe.normalize(images.float()).flatten(2).transpose(1, 2)).mean(1)
    torch.testing.assert_close(features, expected)


def test_missing_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_probe.main(["--ckpt", str(tmp_path / "nope.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("eval_probe.py: error: ") and err.count("\n") == 1 and "Traceback" not in err


def damage(path):
    """Overwrite 16 bytes in the middle of a checkpoint, inside its tensor data (the zip stays readable)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 16)


def read_only_folder(monkeypatch, folder):
    """Makes `folder` read-only for this process's Python writes, as chmod would for a user other than
    root (the tests may run as root, whom chmod does not stop)."""
    folder.mkdir(parents=True, exist_ok=True)
    real_open = open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and os.path.abspath(os.fspath(file)).startswith(str(folder)):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)


def fake_checkpoint(path, **overrides):
    config = {"data": "synthetic", "data_dir": None, "model": "nano", "img_size": 32, "patch_size": 4,
              "embed_dim": None, "depth": None, "num_heads": None, "seed": 0}
    torch.manual_seed(1)
    context, target = model.build_encoder("nano", 32, 4), model.build_encoder("nano", 32, 4)
    checkpoint = {"config": config, "git_commit": "test", "step": 7,
                  "context_encoder": context.state_dict(), "target_encoder": target.state_dict()}
    checkpoint.update(overrides)
    torch.save(checkpoint, path)
    return checkpoint


@pytest.mark.parametrize("fault", ["not a checkpoint", "truncated", "damaged", "NaN or Inf", "--workers", "--json",
                                   "cannot write", "--k 500 is more than the 20 training images"])
def test_eval_probe_refuses_bad_checkpoints_and_arguments_in_one_line(fault, tmp_path, capsys, monkeypatch):
    """A text file is not a checkpoint, a cut one is truncated; an unwritable --json and a --k above the
    training images are refused before any feature is computed."""
    path = tmp_path / "ckpt.pt"
    argv = ["--ckpt", str(path), "--device", "cpu", "--workers", "0"]
    if fault == "not a checkpoint":
        path.write_text("some notes")
    elif fault == "truncated":
        fake_checkpoint(path)
        os.truncate(path, os.path.getsize(path) // 2)
    elif fault == "cannot write":
        fake_checkpoint(path)
        argv += ["--json", str(tmp_path / "readonly" / "result.json")]
        read_only_folder(monkeypatch, tmp_path / "readonly")
    elif fault.startswith("--k"):
        fake_checkpoint(path)
        argv += ["--k", "500", "--limit", "20"]
    elif fault == "damaged":
        fake_checkpoint(path)
        damage(path)
    elif fault == "NaN or Inf":                                        # a diverged run
        diverged = model.build_encoder("nano", 32, 4).state_dict()
        diverged["blocks.0.mlp.fc1.weight"][0, 0] = float("inf")
        fake_checkpoint(path, target_encoder=diverged)
    elif fault == "--workers":
        fake_checkpoint(path)
        argv[-1] = "-1"
    else:
        fake_checkpoint(path)
        argv += ["--json", str(tmp_path / "missing" / "result.json")]
    with pytest.raises(SystemExit) as exit_info:
        eval_probe.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("eval_probe.py: error: ") and fault in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("features_*"))                      # refused before any work


def test_cached_features_are_recomputed_when_the_image_folder_changes(tmp_path):
    """The feature cache is keyed by data.fingerprint: a folder that gains a class (or a file, or
    relabels one) gets new features, not the stale ones."""
    for label in ("a", "b"):
        for i in range(10):
            _save(_noise_rgb(i + 10 * len(label)), tmp_path / "images" / label / f"{i}.png")
    fake_checkpoint(tmp_path / "ckpt.pt")
    argv = ["--ckpt", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "images"), "--device", "cpu",
            "--workers", "0", "--k", "3"]
    assert eval_probe.main(argv)["num_classes"] == 2
    for i in range(10):
        _save(_noise_rgb(100 + i), tmp_path / "images" / "c" / f"{i}.png")
    result = eval_probe.main(argv)
    assert result["num_classes"] == 3 and result["num_train"] == 27
    first = data.fingerprint(data.build_dataset(str(tmp_path / "images"), None, "train", 16, augment=False))
    os.replace(tmp_path / "images" / "c" / "0.png", tmp_path / "images" / "b" / "99.png")   # relabel one file
    assert data.fingerprint(data.build_dataset(str(tmp_path / "images"), None, "train", 16, augment=False)) != first
    synthetic = [data.fingerprint(data.build_dataset("synthetic", None, "train", 16, False, seed)) for seed in (0, 0, 1)]
    assert synthetic[0] == synthetic[1] != synthetic[2]


def test_checkpoint_that_does_not_fit_its_config_exits_2(tmp_path, capsys):
    wide = model.build_encoder("nano", 32, 4, embed_dim=64, num_heads=4).state_dict()
    fake_checkpoint(tmp_path / "ckpt.pt", target_encoder=wide)
    with pytest.raises(SystemExit) as exit_info:
        eval_probe.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--device", "cpu", "--workers", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "target_encoder" in err and err.count("\n") == 1 and "Traceback" not in err


def test_main_on_a_nano_checkpoint_reports_and_caches(tmp_path, monkeypatch):
    fake_checkpoint(tmp_path / "ckpt.pt")
    argv = ["--ckpt", str(tmp_path / "ckpt.pt"), "--limit", "200", "--batch-size", "64",
            "--device", "cpu", "--workers", "0", "--k", "5", "--json", str(tmp_path / "result.json")]
    result = eval_probe.main(argv)
    assert result["num_train"] == 200 and result["num_val"] == 200 and result["feature_dim"] == 96
    assert result["step"] == 7 and result["encoder"] == "target" and not result["random_init"]
    # the reported accuracies are those of the cached features (not merely numbers in [0, 1])
    cache = {split: torch.load(tmp_path / f"features_target_{split}.pt") for split in ("train", "val")}
    scores = eval_probe.knn_classify(cache["train"]["features"], cache["train"]["labels"], cache["val"]["features"],
                                     10, k=5)
    assert result["knn_top1"] == eval_probe.topk_accuracy(scores, cache["val"]["labels"])
    assert result["linear_top1"] == eval_probe.linear_probe(cache["train"]["features"], cache["train"]["labels"],
                                                            cache["val"]["features"], cache["val"]["labels"], 10)["top1"]
    assert "linear_top5" not in result  # 10 synthetic classes
    assert json.loads((tmp_path / "result.json").read_text())["knn_top1"] == result["knn_top1"]
    assert (tmp_path / "features_target_train.pt").exists()

    # A second run reads the cache instead of running the encoder again...
    monkeypatch.setattr(eval_probe, "extract_features", lambda *args: pytest.fail("cache not used"))
    assert eval_probe.main(argv)["knn_top1"] == result["knn_top1"]
    # ...but not a cache saved under another key: a different subset is different features.
    monkeypatch.undo()
    assert eval_probe.main(argv + ["--limit", "100"])["num_train"] == 100
    random = eval_probe.main(argv + ["--limit", "100", "--random-init"])
    assert random["random_init"] and random["step"] == 0
    trained_val = torch.load(tmp_path / "features_target_val.pt")["features"]
    random_val = torch.load(tmp_path / "features_random_val.pt")["features"]
    assert trained_val.shape == random_val.shape and not torch.allclose(trained_val, random_val)


def test_pca_colors_are_a_function_of_the_features_alone():
    """Equal patch features get equal colours in every image, different kinds of patch get different
    colours, and neither an offset shared by all patches nor the basis the features are written in (a
    rotation, which also flips the signs SVD returns) changes a colour."""
    generator = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 16, generator=generator)                 # four kinds of patch, D = 16
    kinds = torch.tensor([[0, 1, 2, 3] * 4, [0, 1] * 8])                   # (B=2, N=16); image 1 lacks kinds 2, 3
    features = centres[kinds]                                              # (2, 16, 16)
    colors = eval_probe.pca_colors(features)                               # (2, 16, 3)
    assert colors.shape == (2, 16, 3) and colors.min() >= 0 and colors.max() <= 1
    for kind in range(4):
        same = colors[kinds == kind]                                       # every patch of this kind, both images
        torch.testing.assert_close(same, same[:1].expand_as(same), atol=1e-5, rtol=0)
    palette = torch.stack([colors[kinds == kind][0] for kind in range(4)])  # (4, 3)
    assert torch.pdist(palette).min() > 0.2                                 # clearly different colours
    torch.testing.assert_close(eval_probe.pca_colors(features + 100), colors, atol=1e-3, rtol=0)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))   # (D, D) orthogonal
    torch.testing.assert_close(eval_probe.pca_colors(features @ rotation), colors, atol=1e-5, rtol=0)


def test_eval_probe_draws_trained_beside_random_init_feature_maps(tmp_path):
    fake_checkpoint(tmp_path / "ckpt.pt")
    argv = ["--ckpt", str(tmp_path / "ckpt.pt"), "--limit", "20", "--k", "3", "--device", "cpu", "--workers", "0",
            "--no-cache"]
    eval_probe.main(argv)
    with Image.open(tmp_path / "features_target.png") as figure:          # by default, beside the checkpoint
        assert figure.format == "PNG"
        pixels = np.asarray(figure.convert("RGB"))
    panel, gap = 96, eval_probe.GAP                                        # 32 px images, enlarged 3x
    assert pixels.shape == (gap + 3 * (panel + gap), eval_probe.LABEL_WIDTH + 8 * (panel + gap), 3)
    rows = [pixels[gap + row * (panel + gap):][:panel, eval_probe.LABEL_WIDTH:] for row in range(3)]
    image, trained, random = (row.reshape(panel, 8, panel + gap, 3)[:, :, :panel] for row in rows)
    assert image.std() > 10                                                # the images are drawn
    # each of the 8 x 8 patches is one colour (4 px patches, enlarged 3x: 12 x 12 pixels)
    blocks = trained.reshape(8, 12, 8, 8, 12, 3)
    assert (blocks == blocks[:, :1, :, :, :1]).all()
    assert (trained != random).any(axis=-1).mean() > 0.5                   # two encoders, two maps
    assert not list(tmp_path.glob("*.tmp*"))                               # the figure was renamed into place

    os.remove(tmp_path / "features_target.png")
    eval_probe.main(argv + ["--no-figure"])
    eval_probe.main(argv + ["--figure", str(tmp_path / "elsewhere.png")])
    assert not (tmp_path / "features_target.png").exists() and (tmp_path / "elsewhere.png").exists()


# ============================================================================= train.py

# A model small enough that a training step takes a few milliseconds.
FAST = ["--model", "nano", "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--pred-dim", "16",
        "--pred-depth", "1", "--pred-heads", "2", "--num-slices", "32", "--batch-size", "16", "--log-every", "1",
        "--device", "cpu"]  # a device-generic test appends its own --device (the last one wins)


def run_train(out, *args):
    train.main(FAST + ["--out", str(out), *args])
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def metrics_without_timing(out):
    """metrics.jsonl rows minus img/s and time_s, the fields two identical runs may differ in."""
    return [{k: v for k, v in row.items() if k not in ("img_per_s", "time_s")} for row in read_metrics(out)]


def test_short_run_lowers_the_loss_and_writes_its_outputs(tmp_path, device):
    ckpt = run_train(tmp_path / "run", "--steps", "40", "--lr", "3e-3", "--device", device.type)
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 40 and ckpt["step"] == 40
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.7 * first
    for key in ("l2", "sigreg", "lr", "momentum", "img_per_s", "feature_std", "effective_rank", "skipped_images"):
        assert key in rows[-1]
    assert os.path.getsize(tmp_path / "run" / "curves.png") > 1000
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["steps"] == 40
    assert ckpt["config"]["embed_dim"] == 32 and ckpt["git_commit"]


def test_feature_health_measures_spread_and_effective_rank(tmp_path, monkeypatch, capsys):
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(512, 32, generator=generator)
    std, rank = runs.feature_health(gaussian)
    assert 0.95 < std < 1.05 and 28 < rank <= 32                 # isotropic: nearly every direction used
    _, rank = runs.feature_health(torch.randn(512, 2, generator=generator) @ torch.randn(2, 32, generator=generator))
    assert 1 < rank <= 2.01                                       # two directions
    std, rank = runs.feature_health(torch.ones(512, 32))
    assert std == 0 and rank == pytest.approx(1)                  # full collapse
    for health, warned in (((1e-4, 20.0), True), ((1.0, 1.0), True), ((1.0, 20.0), False)):
        monkeypatch.setattr(runs, "feature_health", lambda pooled: health)   # the loop reads them and warns
        run_train(tmp_path / str(health), "--steps", "1")
        assert ("target features look collapsed at step 1" in capsys.readouterr().out) == warned, health


def test_without_sigreg_the_features_lose_dimensions(tmp_path):
    """The audit's lesson in small: watch the features, not the loss. With the prediction loss alone
    (lam 0, stop-gradient target) the target features' effective rank, averaged over the last 10
    logged steps, ends far below the same run's with SIGReg (lam 0.3, the sweep's largest), which also
    spreads them out (std). Over seeds 0, 1, 2 (80 steps): 4.3 / 4.0 / 4.2 without SIGReg against
    6.1 / 6.4 / 6.1 with it, while the loss without SIGReg fell 292 / 82 / 8-fold: a falling loss
    says nothing either way."""
    args = ("--steps", "80", "--lr", "1e-2", "--ema", "0", "--ema-end", "0")
    rows = {}
    for lam in ("0", "0.3"):
        run_train(tmp_path / lam, *args, "--lam", lam)
        rows[lam] = read_metrics(tmp_path / lam)
    rank = {lam: sum(r["effective_rank"] for r in rows[lam][-10:]) / 10 for lam in rows}
    assert rank["0"] < rank["0.3"] - 1.5, rank
    assert rows["0.3"][-1]["feature_std"] > 2 * rows["0.3"][0]["feature_std"]


def test_every_trainable_parameter_gets_a_gradient_and_is_optimized(device):
    cfg = train.resolve(train.Config(model="nano", depth=2, batch_size=8, num_slices=16, device=device.type))
    nets = [m.to(device) for m in train.build_models(cfg)]
    optimizer = train.build_optimizer(cfg, nets[0], nets[1])
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    images = torch.randn(8, 3, 32, 32).to(device)
    step_masks = train.sample_step_masks(cfg, 0, (8, 8), 0, 1, device)
    loss, l2, regularizer, _ = train.forward_loss(cfg, nets, images, step_masks, 0, (8, 8))
    regularizer.backward(retain_graph=True)   # SIGReg alone must reach every encoder weight (no cut by a cast)
    for name, p in nets[0].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"SIGReg does not reach {name}"
    optimizer.zero_grad()
    loss.backward()
    for module in nets[:2]:
        for name, p in module.named_parameters():
            assert id(p) in optimized, f"{name} is not given to the optimizer"
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
    assert all(p.grad is None and not p.requires_grad for p in nets[2].parameters())  # the target: EMA only


def test_predictions_and_targets_are_paired_row_by_row_with_their_image(monkeypatch):
    """With M = 4 target blocks, predictor row r belongs to image r // M: its targets must be the
    target encoder's features of that image at that row's patches (repeat instead of
    repeat_interleave would pair row 1 with image 1 instead of image 0)."""
    cfg = train.resolve(train.Config(model="nano", depth=1, pred_depth=1, batch_size=4, num_slices=8))
    nets = list(train.build_models(cfg))
    patches = (cfg.img_size // cfg.patch_size) ** 2
    # a target encoder whose feature d of patch n of image b is 1000 b + n: the value names its source
    nets[2] = lambda images: (1000 * torch.arange(len(images))[:, None, None] + torch.arange(patches)[None, :, None]
                              ).float().expand(len(images), patches, nets[0].embed_dim)
    seen = {}
    monkeypatch.setattr(losses, "jepa_loss", lambda p, targets, valid, *a, **k: seen.update(targets=targets, valid=valid)
                        or (p.sum(), p.sum(), p.sum()))
    step_masks = train.sample_step_masks(cfg, 0, (8, 8), 0, 1, torch.device("cpu"))
    train.forward_loss(cfg, nets, torch.randn(4, 3, 32, 32), step_masks, 0, (8, 8))
    target_idx, target_valid = step_masks[2], step_masks[3]
    blocks = target_idx.shape[0] // 4
    assert blocks == 4
    image_of_row = torch.arange(len(target_idx)) // blocks
    expected = (1000 * image_of_row[:, None] + target_idx).float()                      # (R, T)
    assert torch.equal(seen["targets"][..., 0][target_valid], expected[target_valid])


def test_the_prediction_loss_alone_reaches_every_encoder_weight():
    """lam = 0: the encoder learns through the predictor only; a context detached before the
    predictor (or a cast that cuts the graph) would leave encoder weights without a gradient."""
    cfg = train.resolve(train.Config(model="nano", depth=2, batch_size=8, num_slices=16, lam=0.0))
    nets = train.build_models(cfg)
    step_masks = train.sample_step_masks(cfg, 0, (8, 8), 0, 1, torch.device("cpu"))
    loss, _, _, _ = train.forward_loss(cfg, nets, torch.randn(8, 3, 32, 32), step_masks, 0, (8, 8))
    loss.backward()
    for name, p in nets[0].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"L2 does not reach {name}"


def test_pooled_embeddings_average_the_real_tokens_only():
    tokens = torch.randn(3, 5, 4)
    valid = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    poisoned = torch.where(valid[..., None], tokens, float("inf"))
    poisoned[2, 3, 0] = float("nan")
    pooled = train.pool_tokens(poisoned, valid)
    expected = torch.stack([tokens[b][valid[b]].mean(0) for b in range(3)])
    torch.testing.assert_close(pooled, expected)


def test_sigreg_on_pooled_tests_one_row_per_image_end_to_end(tmp_path, monkeypatch):
    """--sigreg-on pooled hands SIGReg the B mean-pooled context rows (padding excluded), not the
    tokens, and a run with it trains to finite losses."""
    cfg = train.resolve(train.Config(model="nano", depth=2, batch_size=8, num_slices=16, sigreg_on="pooled"))
    nets = train.build_models(cfg)
    step_masks = train.sample_step_masks(cfg, 0, (8, 8), 0, 1, torch.device("cpu"))
    seen = []
    real_loss = losses.jepa_loss
    monkeypatch.setattr(losses, "jepa_loss", lambda *args, **kw: seen.append(args[3]) or real_loss(*args, **kw))
    images = torch.randn(8, 3, 32, 32)
    result = train.forward_loss(cfg, nets, images, step_masks, 0, (8, 8))
    context_idx, context_valid = step_masks[:2]
    with torch.no_grad():
        context = nets[0](images, context_idx, context_valid)                                  # (B, K, D)
    expected = torch.stack([context[b][context_valid[b]].mean(0) for b in range(8)])           # (B, D)
    assert seen[0].shape == (8, nets[0].embed_dim) and bool(torch.isfinite(result.loss))
    torch.testing.assert_close(seen[0].detach(), expected)
    monkeypatch.undo()
    run_train(tmp_path, "--steps", "2", "--sigreg-on", "pooled")
    rows = read_metrics(tmp_path)
    assert [row["skipped_steps"] for row in rows] == [0, 0]
    assert all(math.isfinite(row["loss"]) and row["sigreg"] > 0 for row in rows)


def test_small_batches_warn_of_collapse_only_where_the_rank_can_show_it(tmp_path, monkeypatch, capsys):
    """B pooled features have an effective rank of at most B - 1: at batch 2 a rank of 1 is no collapse."""
    monkeypatch.setattr(runs, "feature_health", lambda pooled: (1.0, 1.0))
    run_train(tmp_path / "b2", "--steps", "1", "--batch-size", "2")
    assert "look collapsed" not in capsys.readouterr().out
    run_train(tmp_path / "b8", "--steps", "1", "--batch-size", "8")
    assert "look collapsed" in capsys.readouterr().out


def test_weight_decay_reaches_the_matrices_only_and_follows_its_schedule(tmp_path):
    """I-JEPA's groups: decay on weight matrices and the patch convolution, none on biases, norms and
    the mask token; the scheduled weight decay reaches the first group, the second stays at 0."""
    cfg = train.resolve(train.Config(model="nano", depth=2))
    context_encoder, predictor, _ = train.build_models(cfg)
    decay, no_decay = (set(map(id, group["params"])) for group in
                       train.build_optimizer(cfg, context_encoder, predictor).param_groups)
    for prefix, module in (("encoder", context_encoder), ("predictor", predictor)):
        for name, p in module.named_parameters():
            matrix = name.endswith("weight") and ".norm" not in name and not name.startswith("norm")
            assert (id(p) in decay, id(p) in no_decay) == (matrix, not matrix), f"{prefix}.{name}"
    ckpt = run_train(tmp_path / "run", "--steps", "3", "--weight-decay", "0.1", "--weight-decay-end", "0.5")
    cfg = train.resolve(train.Config(**{**ckpt["config"], "resume": None}))
    last_step_decay = train.schedules(cfg, 2, 3)[1]                    # set before the third step of 3
    groups = ckpt["optimizer"]["param_groups"]
    assert 0.1 < last_step_decay < 0.5
    assert groups[0]["weight_decay"] == pytest.approx(last_step_decay) and groups[1]["weight_decay"] == 0.0


def test_ema_is_updated_after_the_optimizer_step(tmp_path, device):
    ckpt = run_train(tmp_path / "run", "--steps", "1", "--ema", "0.9", "--warmup", "0", "--device", device.type)
    cfg = train.resolve(train.Config(**{**ckpt["config"], "resume": None}))
    before = train.build_models(cfg)[0].state_dict()               # context encoder at step 0
    after = ckpt["context_encoder"]
    for name, target in ckpt["target_encoder"].items():
        assert not torch.equal(before[name], after[name]) or before[name].ndim == 0 or name.endswith("bias")
        # target_1 = 0.9 * context_0 + 0.1 * context_1; an EMA before the step would give context_0
        torch.testing.assert_close(target, 0.9 * before[name] + 0.1 * after[name], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("ema, ema_end", [(0.99, 1.0), (0.99, 0.99), (0.0, 0.0)])
def test_schedules_warm_up_then_follow_their_cosines_and_the_momentum_runs_linearly_to_ema_end(ema, ema_end):
    cfg = train.resolve(train.Config(model="nano", batch_size=8, lr=2e-3, min_lr=1e-6, warmup=0.1,
                                     weight_decay=0.04, weight_decay_end=0.4, ema=ema, ema_end=ema_end))
    total = 200
    rows = [train.schedules(cfg, step, total) for step in range(total + 1)]
    lr, weight_decay, momentum = (np.array(column) for column in zip(*rows))
    assert lr[0] == pytest.approx(2e-3 / 20) and lr[19] == pytest.approx(2e-3)      # 20 warmup steps
    assert lr[20] == pytest.approx(2e-3) and lr[total] == pytest.approx(1e-6)
    assert np.all(np.diff(lr[:20]) > 0) and np.all(np.diff(lr[20:]) < 0)
    assert weight_decay[0] == pytest.approx(0.04) and weight_decay[total] == pytest.approx(0.4)
    assert momentum[0] == pytest.approx(ema) and momentum[total] == pytest.approx(ema_end)
    np.testing.assert_allclose(np.diff(momentum), (ema_end - ema) / total, atol=1e-12)   # linear (constant if equal)


def test_clip_grad_bounds_the_gradient_the_optimizer_sees(device):
    cfg = train.resolve(train.Config(model="nano", depth=2, batch_size=8, num_slices=16, clip_grad=0.01,
                                     device=device.type))
    nets = [m.to(device) for m in train.build_models(cfg)]
    optimizer = train.build_optimizer(cfg, nets[0], nets[1])
    params = [p for m in nets[:2] for p in m.parameters()]
    seen, step = [], optimizer.step

    def step_and_record_the_norm():
        seen.append(torch.nn.utils.get_total_norm([p.grad for p in params]))
        step()

    optimizer.step = step_and_record_the_norm
    step_masks = train.sample_step_masks(cfg, 0, (8, 8), 0, 1, device)
    images = torch.randn(8, 3, 32, 32).to(device)
    out = train.train_step(cfg, nets, optimizer, params, images, step_masks, 0, (8, 8), 0.99)
    assert out[4] > 0.1                                   # the logged norm is the one before clipping
    assert seen[0] == pytest.approx(0.01, rel=1e-3)       # AdamW got the clipped gradient


def test_resume_continues_exactly(tmp_path):
    full = run_train(tmp_path / "full", "--steps", "6", "--ckpt-every", "3")
    os.makedirs(tmp_path / "resumed")
    os.replace(tmp_path / "full" / "ckpt_prev.pt", tmp_path / "resumed" / "ckpt.pt")  # the state at step 3
    with open(tmp_path / "full" / "metrics.jsonl") as f, open(tmp_path / "resumed" / "metrics.jsonl", "w") as g:
        g.writelines(f.readlines()[:5])                             # as if killed after logging step 5
    resumed = run_train(tmp_path / "resumed", "--steps", "6", "--ckpt-every", "3", "--resume")
    for name in ("context_encoder", "target_encoder", "predictor"):
        for key, value in full[name].items():
            assert torch.equal(value, resumed[name][key]), (name, key)
    assert metrics_without_timing(tmp_path / "resumed") == metrics_without_timing(tmp_path / "full")


def test_a_nan_batch_is_skipped_and_too_many_stop_the_run_with_a_checkpoint(tmp_path, device, monkeypatch, capsys):
    calls = {"n": 0}
    normalize = data.normalize

    def poisoned(images, bad_calls):
        calls["n"] += 1
        out = normalize(images)
        return out * float("nan") if calls["n"] in bad_calls else out

    monkeypatch.setattr(data, "normalize", lambda images: poisoned(images, {3}))
    on = ("--device", device.type)
    ckpt = run_train(tmp_path / "one", "--steps", "5", *on)
    assert ckpt["counters"]["skipped_steps"] == 1 and ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["target_encoder"].values())
    calls["n"] = 0
    monkeypatch.setattr(data, "normalize", lambda images: poisoned(images, set(range(3, 100))))
    with pytest.raises(SystemExit) as exit_info:
        run_train(tmp_path / "many", "--steps", "20", "--max-bad-steps", "4", *on)
    assert exit_info.value.code == 1
    assert "non-finite" in capsys.readouterr().err
    saved = torch.load(tmp_path / "many" / "ckpt.pt", weights_only=True)
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["context_encoder"].values())
    # a stop signal during a run of skipped steps is honoured at once, not after --max-bad-steps of them

    def stop_at_fourth_call(images):
        if calls["n"] == 3:
            runs.Stop.signal_number = signal.SIGTERM
        return poisoned(images, set(range(3, 100)))

    calls["n"] = 0
    monkeypatch.setattr(data, "normalize", stop_at_fourth_call)
    with pytest.raises(SystemExit) as exit_info:
        run_train(tmp_path / "stopped", "--steps", "20", "--max-bad-steps", "4", *on)
    assert exit_info.value.code == 128 + signal.SIGTERM
    saved = torch.load(tmp_path / "stopped" / "ckpt.pt", weights_only=True)
    assert saved["step"] == 2 and saved["counters"]["skipped_steps"] == 2


def test_a_signal_during_the_last_step_lets_the_run_finish(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    normalize = data.normalize

    def signal_at_the_third_batch(images):
        calls["n"] += 1
        if calls["n"] == 3:
            runs.Stop.signal_number = signal.SIGINT
        return normalize(images)

    monkeypatch.setattr(data, "normalize", signal_at_the_third_batch)
    assert run_train(tmp_path / "run", "--steps", "3")["step"] == 3          # no SystemExit
    assert "done: 3 steps" in capsys.readouterr().out and (tmp_path / "run" / "curves.png").exists()


@pytest.fixture(scope="module")
def nano_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("nano")
    run_train(out / "run", "--steps", "2")
    return out / "run" / "ckpt.pt"


BAD_ARGUMENTS = [
    ["--batch-size", "x"], ["--batch-size", "0"], ["--batch-size", "1"], ["--batch-size", "-4"], ["--lr", "fast"],
    ["--steps", "0"], ["--lam", "nan"], ["--lam", "-0.1"],
    ["--img-size", "30"], ["--patch-size", "0"], ["--model", "huge"], ["--lam", "2"], ["--precision", "fp16"],
    ["--sigreg-on", "everything"], ["--clip-grad", "0"], ["--clip-grad", "nan"], ["--device", "tpu"],
    ["--workers", "-1"], ["--no-such-flag"],
    ["--data", "no_such_dataset"], ["--data", "imagenet100", "--data-dir", "/nonexistent"],
    ["--data", "cifar10", "--data-dir", "/nonexistent"], ["--batch-size", "100000"], ["--ema", "1.5"],
    ["--embed-dim", "30", "--num-heads", "4"], ["--img-size", "32", "--patch-size", "16"], ["--lr", "inf"],
    ["--weight-decay", "inf"], ["--data-dir", "/nonexistent"],
]


@pytest.mark.parametrize("args", BAD_ARGUMENTS, ids=lambda a: " ".join(a))
def test_bad_arguments_get_one_line_and_exit_code_2(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(tmp_path / "run"), "--steps", "1", *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error:"), err
    assert not (tmp_path / "run").exists()                           # no empty --out folder left behind


def test_resume_into_another_architecture_and_overwriting_a_run_are_refused(nano_checkpoint, tmp_path, capsys):
    for args in (["--resume", str(nano_checkpoint), "--embed-dim", "64"], []):
        with pytest.raises(SystemExit) as exit_info:
            train.main(FAST[:-2] + ["--steps", "3", "--out", str(nano_checkpoint.parent), *args])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and "already holds a checkpoint" in err
    assert torch.load(nano_checkpoint, weights_only=True)["step"] == 2  # nothing saved was lost


def test_resume_and_out_mistakes_get_one_line_and_lose_nothing(nano_checkpoint, tmp_path, capsys):
    """--resume of another run into a folder holding its own, of a file train.py did not write, or of
    a run already past --steps; --out naming a file. A folder given to --resume means its ckpt.pt."""
    other = tmp_path / "other"
    run_train(other, "--steps", "1")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "a_file").write_text("keep me")
    capsys.readouterr()
    cases = [(["--out", str(other), "--resume", str(nano_checkpoint)], "already holds a checkpoint of its own"),
             (["--out", str(tmp_path / "new"), "--resume", str(tmp_path / "foreign.pt")], "not a train.py checkpoint"),
             (["--out", str(tmp_path / "new"), "--resume", str(nano_checkpoint), "--steps", "1"],
              "but this run has only"),
             (["--out", str(tmp_path / "a_file")], "is a file, not a folder")]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            train.main(FAST + ["--steps", "3", *args])
        err = capsys.readouterr().err.strip().splitlines()[-1]   # after any warning
        assert exit_info.value.code == 2 and err.startswith("train.py: error:") and message in err, err
    assert torch.load(other / "ckpt.pt", weights_only=True)["step"] == 1 and not (other / "ckpt_prev.pt").exists()
    assert torch.load(nano_checkpoint, weights_only=True)["step"] == 2
    assert (tmp_path / "a_file").read_text() == "keep me"
    resumed = run_train(tmp_path / "from_folder", "--steps", "3", "--resume", str(nano_checkpoint.parent))
    assert resumed["step"] == 3 and (tmp_path / "from_folder" / "curves.png").exists()   # one logged step: a dot


def test_a_checkpoint_from_before_a_new_config_field_still_resumes(nano_checkpoint, tmp_path):
    """Fields added to Config later (here clip_grad) are absent from older checkpoints: resume must work."""
    state = torch.load(nano_checkpoint, weights_only=True)
    del state["config"]["clip_grad"]
    os.makedirs(tmp_path / "old")
    torch.save(state, tmp_path / "old" / "ckpt.pt")
    resumed = run_train(tmp_path / "old", "--steps", "3", "--resume")
    assert resumed["step"] == 3


# ============================================================================= first runs and resumes (issue 25)

def copy_run(nano_checkpoint, where):
    """A copy of the nano fixture's finished run (2 steps), and the bytes of each of its files."""
    shutil.copytree(nano_checkpoint.parent, where)
    return {name: (where / name).read_bytes() for name in os.listdir(where)}


def train_exit(args, capsys):
    """(exit code, stdout, stderr) of train.main(FAST + args); 0 when it returns."""
    try:
        train.main(FAST + args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", ["same folder", "fork, same steps", "fork, more steps", "no --out"])
def test_resuming_a_finished_run_does_nothing_and_forking_it_continues(case, nano_checkpoint, tmp_path, monkeypatch,
                                                                      capsys):
    """A finished run resumed with the same --steps says so in one line, exit 0, and rewrites nothing (nor
    makes the fork's folder); a fork with more steps trains on, its metrics starting with the source's
    rows; --resume RUN without --out continues RUN, not runs/default."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "x"
    before = copy_run(nano_checkpoint, run)
    fork = tmp_path / "fork"
    steps = "2" if case in ("same folder", "fork, same steps") else "3"
    out = {"same folder": ["--out", str(run)], "no --out": []}.get(case, ["--out", str(fork)])
    code, stdout, stderr = train_exit(["--steps", steps, "--resume", str(run), *out], capsys)
    assert code == 0 and "Traceback" not in stderr
    if steps == "2":
        assert stdout.strip().count("\n") == 0 and "already finished at step 2" in stdout
        assert not fork.exists()
    continued = fork if case == "fork, more steps" else run
    if case == "fork, more steps" or case == "no --out":
        assert torch.load(continued / "ckpt.pt", weights_only=True)["step"] == 3
        assert [row["step"] for row in read_metrics(continued)] == [1, 2, 3]
    assert not (tmp_path / "runs").exists()
    if case != "no --out":
        assert {name: (run / name).read_bytes() for name in os.listdir(run)} == before


@pytest.mark.parametrize("args, message", [
    (["--data", "no_such_dataset"], "unknown --data"),
    (["--data", "cifar10", "--data-dir", "/nonexistent"], "CIFAR-10 not found"),
    (["--batch-size", "100000"], "larger than the"),
    (["--embed-dim", "64"], "another architecture (embed_dim=32 there, 64 here): pick another --out"),
], ids=["unknown data", "missing data", "batch above the data", "another architecture"])
def test_a_taken_run_folder_is_reported_only_after_the_data_checks_and_with_advice_that_works(
        args, message, nano_checkpoint, tmp_path, capsys):
    """--out holding a run: a mistake in --data or --batch-size is named first, and the advice fits (no
    --resume where the architecture differs)."""
    before = copy_run(nano_checkpoint, tmp_path / "run")
    code, _, err = train_exit(["--steps", "3", "--out", str(tmp_path / "run"), *args], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert {name: (tmp_path / "run" / name).read_bytes() for name in os.listdir(tmp_path / "run")} == before


@pytest.mark.parametrize("fault", ["text file as --resume", "missing --resume", "empty image folder",
                                   "--resume past --steps", "unwritable --out", "out of memory before any step"])
def test_failures_get_one_line_and_leave_no_empty_run_folder(fault, nano_checkpoint, tmp_path, monkeypatch, capsys):
    """After argument parsing every failure is one line (no warning before it) and the --out folder it
    would have made is gone again; a text file is not a checkpoint, not a damaged one."""
    out, args = tmp_path / "new" / "run", ["--steps", "3"]
    expected = {"text file as --resume": "is not a checkpoint", "missing --resume": "no checkpoint at",
                "empty image folder": "no class folders", "--resume past --steps": "has only 1 steps",
                "unwritable --out": "cannot write there", "out of memory before any step": "lower --batch-size"}
    if fault == "text file as --resume":
        (tmp_path / "notes.txt").write_text("my notes")
        args += ["--resume", str(tmp_path / "notes.txt")]
    elif fault == "missing --resume":
        args += ["--resume", str(tmp_path / "nothing.pt")]
    elif fault == "empty image folder":
        (tmp_path / "images").mkdir()
        args += ["--data", str(tmp_path / "images"), "--img-size", "32", "--patch-size", "4"]
    elif fault == "--resume past --steps":                        # with a changed --steps, which warns
        args = ["--steps", "1", "--resume", str(nano_checkpoint)]
    elif fault == "unwritable --out":
        read_only_folder(monkeypatch, tmp_path / "new")
    else:
        def no_memory(*a):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        monkeypatch.setattr(runs, "restore", no_memory)
    code, _, err = train_exit([*args, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("train.py: error:"), err
    assert expected[fault] in err and "Traceback" not in err and "warning" not in err, err
    assert not out.exists() and (fault == "unwritable --out") == (tmp_path / "new").exists()


@pytest.mark.parametrize("args, flags", [([], "--batch-size or --img-size"), (["--img-size", "64"], "--img-size"),
                                         (["--batch-size", "32"], "--batch-size")])
def test_out_of_cpu_memory_names_the_size_flag_the_command_line_raised(args, flags, tmp_path, monkeypatch, capsys):
    """The CPU allocator's error (a RuntimeError, not torch.OutOfMemoryError) is one line too."""
    def no_memory(*a):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(train, "train_step", no_memory)
    at = FAST.index("--batch-size")
    argv = FAST[:at] + FAST[at + 2:] + ["--steps", "2", "--out", str(tmp_path / "run"), *args]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"train.py: error: out of memory: lower {flags}; checkpoints already written are kept")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_advice_fits_the_run(precision, tmp_path, monkeypatch, capsys):
    """--precision fp32 is advised only to a bf16 run."""
    monkeypatch.setattr(runs, "slow_cpu_bf16", lambda: None)
    monkeypatch.setattr(data, "normalize", lambda images: torch.full(images.shape, float("nan")))
    code, _, err = train_exit(["--steps", "5", "--max-bad-steps", "2", "--precision", precision,
                               "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "non-finite steps in a row" in err and "lower --lr" in err
    assert ("--precision fp32" in err) == (precision == "bf16")


def test_eval_probe_takes_a_run_folder_says_what_it_evaluates_and_warns_of_a_newer_run(nano_checkpoint, tmp_path,
                                                                                     monkeypatch, capsys):
    result = eval_probe.main(["--ckpt", str(nano_checkpoint.parent), "--limit", "20", "--k", "5", "--device", "cpu",
                              "--no-cache"])
    assert result["ckpt"] == str(nano_checkpoint) and result["step"] == 2
    assert f"evaluating {nano_checkpoint} (step 2" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)                                        # a bare eval_probe.py reads runs/default
    os.makedirs("runs/default")
    (tmp_path / "runs" / "default" / "ckpt.pt").write_text("an old run's stand-in")
    shutil.copytree(nano_checkpoint.parent, tmp_path / "runs" / "foo")
    os.utime(tmp_path / "runs" / "default" / "ckpt.pt", (1, 1))
    with pytest.raises(SystemExit):
        eval_probe.main(["--device", "cpu"])
    warning, error = capsys.readouterr().err.splitlines()
    assert "runs/default/ckpt.pt" in warning and "--ckpt runs/foo" in warning and "not a checkpoint" in error


class RecordingBar(tqdm.tqdm):
    """A progress bar that records its postfix at each step."""
    postfixes = []

    def update(self, n=1):
        RecordingBar.postfixes.append(self.postfix)
        return super().update(n)


def test_a_run_reports_briefly_and_shows_the_current_loss(tmp_path, monkeypatch, capsys):
    """A summary of a few short lines (not the whole config), each step's own loss on the progress bar,
    a done line with the time taken and the next command, and the training time in every metrics row."""
    RecordingBar.postfixes = []
    monkeypatch.setattr(train, "tqdm", RecordingBar)
    run_train(tmp_path / "run", "--steps", "3")
    out = capsys.readouterr().out
    assert all(len(line) < 200 + len(str(tmp_path)) for line in out.splitlines()) and "config:" not in out
    assert "recipe synthetic" in out and "encoder" in out and "3 steps of 16 images" in out
    assert "done: 3 steps in " in out and f"next: python eval_probe.py --ckpt {tmp_path / 'run' / 'ckpt.pt'}" in out
    rows = read_metrics(tmp_path / "run")
    assert RecordingBar.postfixes == [f"loss={row['loss']:.4f}" for row in rows]
    times = [row["time_s"] for row in rows]
    assert times == sorted(times) and times[0] >= 0 and {"img_per_s", "loss", "skipped_images"} <= set(rows[0])
    progress = runs.Progress(step=5, started=time.perf_counter() - 50)   # 5 steps in 50 s, 95 to go
    runs.estimate(progress, total=100)
    assert "about 15m 5" in capsys.readouterr().out


def test_curves_use_a_log_scale_where_a_series_spans_decades_and_draw_a_single_row(tmp_path):
    _, ticks, log = runs.axis([1.0, 0.1, 1e-4])
    assert log and [label for _, label in ticks] == ["1e-4", "1e-3", "1e-2", "1e-1", "1e0"]
    _, ticks, log = runs.axis([0.9, 0.5])
    assert not log and [label for _, label in ticks] == ["0.5", "0.6", "0.7", "0.8", "0.9"]
    assert [label for _, label in runs.axis([0.083, 0.214])[1]] == ["0.10", "0.15", "0.20"]
    assert not runs.axis([-1.0, 1e3])[2] and runs.axis([2.0, 2.0])[1] == [(2.0, "2")]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, "loss": 1.0, "l2": 0.5, "sigreg": 0.0, "effective_rank": 3.0}) + "\n")
    runs.plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size == (4 * 420, 280)


# ============================================================================= faults: signals, kills, processes

def subprocess_env():
    # one thread per process: two processes with two threads each on two cores stall each other
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_in_own_session(command, timeout, input=None):
    """Run `command` (and whatever it starts) in a new session; on timeout, kill all of it, so that no
    hung child outlives its test. Returns (returncode, stdout, stderr)."""
    process = subprocess.Popen(command, cwd=HERE, env=subprocess_env(), text=True, start_new_session=True,
                               stdin=subprocess.PIPE if input is not None else None,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(command[:6])} ...\n{stderr[-3000:]}")
    return process.returncode, stdout, stderr


# Runs train.main once per JSON line on stdin, [fault or null, argv], each in a child forked from
# this one process: the children share one import of torch and train (about 6 s each otherwise). Each
# reseeds Python's and numpy's global generators as a new process would; what stays shared is the
# hash seed, so the test's reference run is a separate process. A fault, kind:n, makes the child
# SIGKILL itself at the n-th EMA update (after the optimizer step, before the EMA), half-way through
# the n-th torch.save, just before the n-th os.replace, or half-way through writing the n-th metrics
# line. Prints each child's wait status, and stops at the first that is not the one expected.
FORKED_TRAIN = r"""
import json, os, random, signal, sys, traceback
import numpy as np, torch, runs, train
def install(kind, n):
    calls = {"count": 0}
    def due():
        calls["count"] += 1
        return calls["count"] == int(n)
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "step":
        ema_update = train.ema_update
        train.ema_update = lambda *a: die() if due() else ema_update(*a)
    if kind == "save":
        save = torch.save
        def half_save(state, path):
            save(state, path)
            if due():
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                die()
        torch.save = half_save
    if kind == "replace":
        replace = os.replace
        os.replace = lambda a, b: die() if due() else replace(a, b)
    if kind == "metrics":
        write_row = runs.write_row
        def half_row(path, row):
            if due():
                with open(path, "a") as f:
                    f.write('{"step": ' + str(row["step"]))
                    f.flush()
                die()
            write_row(path, row)
        runs.write_row = half_row
for line in sys.stdin:
    fault, argv = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            random.seed()
            np.random.seed()
            if fault:
                install(*fault.split(":"))
            train.main(argv)
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    status = os.waitpid(pid, 0)[1]
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print(json.dumps({"fault": fault, "killed": killed, "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}))
    if killed != bool(fault):
        break
"""


def test_killed_at_six_points_and_resumed_ends_exactly_like_an_uninterrupted_run(tmp_path):
    args = FAST + ["--steps", "14", "--ckpt-every", "2"]
    # the reference runs in a subprocess too: bitwise equality needs the same thread count everywhere
    subprocess.run([sys.executable, "train.py", *args, "--out", str(tmp_path / "reference")], cwd=HERE,
                   env=subprocess_env(), capture_output=True, check=True, timeout=120)
    out = str(tmp_path / "killed")
    # in a resumed process, os.replace call 1 trims metrics.jsonl, 2 and 3 are the first save's two renames
    faults = ["step:3", "save:2", "replace:2", "replace:3", "metrics:3", "step:4"]
    runs = [[fault, args + ["--out", out] + (["--resume"] if i else [])] for i, fault in enumerate(faults)]
    runs += [[None, args + ["--out", out, "--resume"]]]
    _, stdout, stderr = run_in_own_session([sys.executable, "-c", FORKED_TRAIN], timeout=300,
                                           input="".join(json.dumps(run) + "\n" for run in runs))
    statuses = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"fault"')]
    expected = [{"fault": fault, "killed": True, "exit": None} for fault in faults]
    assert statuses == expected + [{"fault": None, "killed": False, "exit": 0}], stderr[-3000:]
    reference = torch.load(tmp_path / "reference" / "ckpt.pt", weights_only=True)
    final = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    for name in ("context_encoder", "target_encoder", "predictor"):
        for key, value in reference[name].items():
            assert torch.equal(value, final[name][key]), (name, key)
    assert metrics_without_timing(out) == metrics_without_timing(tmp_path / "reference")


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "train.py", *FAST, "--steps", "100000", "--out", str(out)], cwd=HERE,
                               env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.exists(out / "metrics.jsonl") and len(read_metrics(out)) >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + signal.SIGTERM and "Resume with" in err
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] >= 3


# Runs train.main(argv + ["--out", OUT_n]) for n = 1 and 2 after making the EMA update of step 3 (after
# its optimizer step) send this process n SIGINTs, as Ctrl-C would, then print "end of step 3" if it
# is still running. Prints each run's exit code after a line "run n".
CTRL_C_TRAIN = r"""
import os, signal, sys, train
ema_update = train.ema_update
def interrupting(presses):
    calls = {"n": 0}
    def update(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
            print("end of step 3", file=sys.stderr, flush=True)
        ema_update(*args)
    return update
for presses in (1, 2):
    print(f"run {presses}", file=sys.stderr, flush=True)
    train.ema_update = interrupting(presses)
    try:
        train.main(sys.argv[2:] + ["--out", os.path.join(sys.argv[1], str(presses))])
    except SystemExit as exit:
        print(f"exit {exit.code}", file=sys.stderr, flush=True)
"""


def test_ctrl_c_says_at_once_it_stops_after_the_step_and_a_second_one_stops_now(tmp_path):
    """One Ctrl-C: a line at once, then the step ends and is saved. Two: the run stops inside the step,
    and the last checkpoint (step 2) stays whole."""
    code, _, err = run_in_own_session([sys.executable, "-c", CTRL_C_TRAIN, str(tmp_path), *FAST, "--steps", "6",
                                       "--ckpt-every", "2"], timeout=120)
    assert code == 0 and "Traceback" not in err and "run 2" in err, err[-3000:]
    once, twice = err.split("run 2")
    for log in (once, twice):
        assert log.count("stopping after this step; Ctrl-C again to stop now") == 1
        assert f"exit {128 + signal.SIGINT}" in log
    assert once.index("stopping after this step") < once.index("end of step 3") < once.index("Resume with")
    assert torch.load(tmp_path / "1" / "ckpt.pt", weights_only=True)["step"] == 3
    assert "end of step 3" not in twice and "interrupted; checkpoints already written are kept" in twice
    assert runs.read_checkpoint(str(tmp_path / "2" / "ckpt.pt"))["step"] == 2
    assert not (tmp_path / "2" / "ckpt_prev.pt").exists()


def torchrun(args, out):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={port}",
               "train.py", *args, "--out", str(out)]
    returncode, stdout, stderr = run_in_own_session(command, timeout=180)
    # Rarely (once in CI, before train.py put a barrier in front of destroy_process_group; never in 50
    # local runs), a rank aborted inside torch's gloo teardown after the run had finished and saved:
    # "terminate called without an active exception". That is torch's bug, not a wrong result; an
    # abort before "done:", or a Python traceback through train.py, still fails the test.
    teardown_abort = ("done:" in stdout and "terminate called without an active exception" in stderr
                      and 'train.py", line' not in stderr)
    if returncode != 0 and teardown_abort:
        warnings.warn("torchrun: a rank aborted in gloo's teardown after the run finished")
    assert returncode == 0 or teardown_abort, stderr[-3000:]
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def assert_same_run(a, b, out_a, out_b):
    for name in ("context_encoder", "target_encoder", "predictor"):
        for key, value in a[name].items():
            torch.testing.assert_close(b[name][key], value, atol=2e-5, rtol=1e-4)
    for row_a, row_b in zip(read_metrics(out_a), read_metrics(out_b), strict=True):
        for key in ("loss", "l2", "sigreg"):
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-4), key


def test_two_processes_equal_one_and_resume_across_world_sizes(tmp_path):
    """On a folder with unreadable files, which both processes must count (each loads its own rows)."""
    for i in range(40):
        _save(_noise_rgb(i), tmp_path / "images" / f"c{i % 2}" / f"{i:02d}.png")
    for name in ("c0/02.png", "c1/05.png", "c1/13.png"):
        (tmp_path / "images" / name).write_bytes(b"not an image")
    folder = ["--data", str(tmp_path / "images"), "--img-size", "32", "--patch-size", "4", "--batch-size", "8"]
    args = FAST + folder + ["--steps", "4", "--ckpt-every", "2"]
    single = run_train(tmp_path / "single", *folder, "--steps", "4", "--ckpt-every", "2")
    double = torchrun(args, tmp_path / "double")
    assert_same_run(single, double, tmp_path / "single", tmp_path / "double")
    assert single["counters"]["skipped_images"] == double["counters"]["skipped_images"] == 3
    # a 1-process checkpoint resumed by 2 processes, and a 2-process one resumed by 1
    for source, world in (("single", 2), ("double", 1)):
        out = tmp_path / f"{source}_to_{world}"
        os.makedirs(out)
        os.replace(tmp_path / source / "ckpt_prev.pt", out / "ckpt.pt")      # the step-2 state
        resumed = torchrun(args + ["--resume"], out) if world == 2 else run_train(out, *folder, "--steps", "4",
                                                                                 "--ckpt-every", "2", "--resume")
        for name in ("context_encoder", "target_encoder", "predictor"):
            for key, value in single[name].items():
                torch.testing.assert_close(resumed[name][key], value, atol=2e-5, rtol=1e-4)


def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path, capsys):
    path = str(tmp_path / "ckpt.pt")
    runs.save_checkpoint(path, {"step": 1, "weights": torch.randn(1000)})
    runs.save_checkpoint(path, {"step": 2, "weights": torch.randn(1000)})
    damage(path)
    state, used, notes = runs.load_checkpoint(path)
    assert state["step"] == 1 and used.endswith("ckpt_prev.pt")
    assert len(notes) == 1 and "damaged" in notes[0]


def test_resuming_past_a_damaged_checkpoint_keeps_the_good_one(tmp_path, capsys):
    """The run resumes from ckpt_prev.pt and sets the damaged ckpt.pt aside, so that its next save
    does not rotate the damaged file over the only good checkpoint."""
    out = tmp_path / "run"
    run_train(out, "--steps", "2", "--ckpt-every", "1")
    damage(out / "ckpt.pt")
    resumed = run_train(out, "--steps", "2", "--ckpt-every", "1", "--resume")
    assert resumed["step"] == 2
    assert runs.load_checkpoint(str(out / "ckpt_prev.pt"))[0]["step"] == 1
    assert (out / "ckpt_damaged.pt").exists() and "moved the damaged" in capsys.readouterr().err


@pytest.mark.parametrize("cache", [False, True])
def test_training_on_a_folder_with_bad_files_runs_to_the_end(tmp_path, cache, capsys):
    good, bad = _messy_folder(tmp_path / "images")
    args = ["--data", str(tmp_path / "images"), "--img-size", "32", "--patch-size", "4", "--steps", "6",
            "--batch-size", "4"]
    ckpt = run_train(tmp_path / "runs" / "run", *args, *(["--cache"] if cache else []))
    assert ckpt["step"] == 6
    # each unreadable file counts once, though two epochs met it: 13 files, 3 batches of 4 an epoch
    dataset = data.build_dataset(str(tmp_path / "images"), None, "train", 32, augment=False)
    assert {dataset.samples[index][0] for index in ckpt["unreadable"]} <= set(bad)
    assert ckpt["counters"]["skipped_images"] == len(ckpt["unreadable"]) >= (0 if cache else 2)
    err = capsys.readouterr()
    assert f"{ckpt['counters']['skipped_images']} unreadable images skipped" in err.out
    assert all(line.startswith("warning: ") for line in err.err.splitlines() if "unreadable" in line)
    assert len(list((tmp_path / "runs").glob("cache/images_train_37_*[0-9a-f].npy"))) == int(cache)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_bf16_step_trains_on_cpu_and_matches_eager(tmp_path, device):
    """The GPU recipe (torch.compile + bf16 autocast) runs end to end on this CPU (and on CUDA), and its
    first step's losses agree with eager bf16 to bf16 precision (same masks, same batch, same weights)."""
    args = ("--steps", "2", "--precision", "bf16", "--device", device.type)
    compiled = run_train(tmp_path / "compiled", *args, "--compile")
    eager = run_train(tmp_path / "eager", *args)
    assert compiled["step"] == 2 and compiled["config"]["compile"]
    first_compiled, first_eager = read_metrics(tmp_path / "compiled")[0], read_metrics(tmp_path / "eager")[0]
    for key in ("loss", "l2", "sigreg"):
        assert first_compiled[key] == pytest.approx(first_eager[key], rel=3e-2), key


def test_bf16_autocast_trains_on_cpu_and_the_checkpoint_feeds_eval_probe(tmp_path, device, monkeypatch, capsys):
    """The GPU code path (bf16 autocast) runs on this CPU (and on CUDA); train -> checkpoint -> eval_probe
    round trip. Where the CPU's bf16 matmuls are slow, training still runs, after a warning that says
    what to do."""
    monkeypatch.setattr(runs, "slow_cpu_bf16", lambda: "bf16 matmuls run 400x slower than fp32 on this CPU")
    ckpt = run_train(tmp_path / "run", "--steps", "3", "--precision", "bf16", "--device", device.type)
    warned = ("train.py: warning: bf16 matmuls run 400x slower than fp32 on this CPU: --precision fp32 will train "
              "much faster") in capsys.readouterr().err
    assert warned == (device.type == "cpu")
    assert ckpt["config"]["precision"] == "bf16"
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in ckpt["context_encoder"].values())
    result = eval_probe.main(["--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--limit", "200", "--k", "5",
                              "--device", device.type])
    assert result["step"] == 3 and result["num_train"] == 200 and result["feature_dim"] == 32
    # the probe read the trained weights of the checkpoint, not a fresh encoder
    eval_probe.main(["--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--limit", "200", "--k", "5", "--random-init",
                    "--device", device.type])
    trained, random = (torch.load(tmp_path / "run" / f"features_{tag}_val.pt")["features"] for tag in ("target", "random"))
    assert trained.shape == random.shape == (200, 32) and not torch.allclose(trained, random)


# ============================================================================= bench.py --gpu-check

@pytest.mark.parametrize("args", [["--device", "tpu"], ["--device", "cuda"], ["--budget", "0"], ["--steps", "0"],
                                  ["--gpu-chec", "x"]], ids=lambda a: " ".join(a))
def test_bench_bad_arguments_get_one_line_and_exit_code_2(args, tmp_path, monkeypatch, capsys):
    """Also --device cuda where there is no GPU (pretended absent on a GPU machine); abbreviations are refused."""
    import bench
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench.py", *args, "--gpu-check", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("bench.py: error:"), err
    assert not (tmp_path / "out").exists()


def test_gpu_check_runs_on_the_cpu_and_reports_every_phase(tmp_path):
    """`python bench.py --gpu-check OUT --device cpu`: the GPU check's code at tiny sizes (nano, 32 px,
    synthetic data), one device test instead of all. Every phase reports finite numbers, and the run
    killed by SIGTERM half-way and resumed ends bitwise equal to the uninterrupted one."""
    out = tmp_path / "check"
    code, stdout, stderr = run_in_own_session(
        [sys.executable, "bench.py", "--gpu-check", str(out), "--device", "cpu",
         "--pytest-k", "normalize_matches and [cpu"], timeout=300)
    assert code == 0, stderr[-3000:]
    with open(out / "gpu_check.json") as f:
        result = json.load(f)
    assert (out / "gpu_check.txt").read_text().startswith("gpu check on cpu")
    tests = result["tests"]
    assert (tests["passed"], tests["failed"], tests["exit"]) == (1, 0, 0), tests
    (row,) = result["steps"]["rows"]
    for key in ("img_s", "step_s", "mfu", "gemm_flop_s", "peak_mem_mb"):
        assert math.isfinite(row[key]) and row[key] > 0, key
    probe = result["probe"]
    assert probe["exit"] == 0 and probe["steps_done"] == 30
    gain = 100 * (probe["trained"]["linear_top1"] - probe["random_init"]["linear_top1"])
    assert probe["linear_gain_points"] == pytest.approx(gain, abs=0.05)   # the gain is of the two probes it ran
    synthetic = result["synthetic"]
    assert synthetic["exit"] == 0 and synthetic["steps_done"] == 40 and synthetic["img_s"] > 0
    assert synthetic["loss_moved"] and synthetic["sigreg_moved"]
    resume = synthetic["resume"]
    assert resume["kill_exit"] == 128 + signal.SIGTERM and 0 < resume["killed_at_step"] < 40
    assert resume["verdict"] == "bitwise" and resume["bitwise"] and resume["metrics_equal"], resume
    assert result["total_s"] < result["budget_s"]


def test_out_of_memory_names_the_flag_to_lower_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    """A CUDA out-of-memory error in the middle of a run: one line naming --batch-size, exit 2, and the
    checkpoint written before it stays whole (raised here on the CPU in place of the GPU's)."""
    calls, train_step = {"n": 0}, train.train_step

    def out_of_memory_at_step_four(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return train_step(*args)

    monkeypatch.setattr(train, "train_step", out_of_memory_at_step_four)
    with pytest.raises(SystemExit) as exit_info:
        run_train(tmp_path / "run", "--steps", "10", "--ckpt-every", "2")
    whole = capsys.readouterr().err
    err = whole.strip().splitlines()[-1]                             # after the progress bar's lines
    assert exit_info.value.code == 2 and "Traceback" not in whole and whole.count("error") == 1
    assert err.startswith("train.py: error: out of GPU memory") and "lower --batch-size" in err
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2
