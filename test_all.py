"""Tests: properties of every concept, on CPU, in about two minutes.  Run: python -m pytest -q test_all.py

Each test names the failure it would catch; several come from audits of earlier JEPA codebases
(context silently shrinking, padding contamination, EMA before the step, modules missing from the
optimizer, gradients cut by .item() or casts, the reference mask sampler's blind spots).
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import losses
import masks
import model
import train

HERE = os.path.dirname(os.path.abspath(__file__))


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
def test_shapes_for_every_preset(name):
    encoder = model.build_encoder(name, 32, 16)
    predictor = model.build_predictor(name)
    images = torch.randn(2, 3, 32, 32)
    d = encoder.embed_dim
    assert encoder(images).shape == (2, 4, d)
    keep = torch.tensor([[0, 3, 0], [1, 2, 3]]), torch.tensor([[True, True, False], [True, True, True]])
    context = encoder(images, *keep)
    assert context.shape == (2, 3, d)
    targets = torch.tensor([[1], [2], [0], [3]]), torch.ones(4, 1, dtype=torch.bool)  # M = 2 blocks per sample
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


def test_padding_never_changes_a_sample():
    """A sample's outputs are the same alone or in a batch with longer samples (no padding contamination)."""
    encoder, predictor = tiny_models()
    encoder.eval()
    images = torch.randn(3, 3, 16, 16)                                   # 4x4 grid
    lengths = [5, 11, 16]
    keep = [torch.randperm(16, generator=torch.Generator().manual_seed(i))[:n].sort().values
            for i, n in enumerate(lengths)]
    idx = torch.zeros(3, 16, dtype=torch.long)
    valid = torch.zeros(3, 16, dtype=torch.bool)
    for i, k in enumerate(keep):
        idx[i, :len(k)], valid[i, :len(k)] = k, True
    target_idx = torch.tensor([[2, 7, 0], [1, 4, 9], [3, 0, 0]])        # one block per sample, padded
    target_valid = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    batched = encoder(images, idx, valid)
    predicted = predictor(batched, idx, valid, target_idx, target_valid, (4, 4))
    # padding pointing elsewhere must not matter either
    idx_other = torch.where(valid, idx, 7)
    torch.testing.assert_close(encoder(images, idx_other, valid)[valid], batched[valid], atol=1e-6, rtol=1e-5)
    for i, k in enumerate(keep):
        alone = encoder(images[i:i + 1], k[None], torch.ones(1, len(k), dtype=torch.bool))
        torch.testing.assert_close(alone[0], batched[i, :len(k)], atol=1e-6, rtol=1e-5)
        t = int(target_valid[i].sum())
        alone_pred = predictor(alone, k[None], torch.ones(1, len(k), dtype=torch.bool), target_idx[i:i + 1, :t],
                               torch.ones(1, t, dtype=torch.bool), (4, 4))
        torch.testing.assert_close(alone_pred[0], predicted[i, :t], atol=1e-6, rtol=1e-5)


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


def test_analytic_flops_match_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    encoder, predictor = tiny_models()
    images = torch.randn(2, 3, 32, 32)
    idx, valid = torch.arange(40).repeat(2, 1), torch.ones(2, 40, dtype=torch.bool)
    # the math backend decomposes attention into matmuls the counter sees (the fused CPU kernel it skips)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        encoder(images, idx, valid)
    assert counter.get_total_flops() == 2 * (encoder.flops(40) + encoder.patch_embed_flops(64))
    context = torch.randn(2, 40, 32)
    t_idx, t_valid = torch.arange(10).repeat(8, 1), torch.ones(8, 10, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        predictor(context, idx, valid, t_idx, t_valid, (8, 8))
    assert counter.get_total_flops() == 2 * predictor.flops(40, 10, 32, num_blocks=4)


# ============================================================================= losses.py

def test_sigreg_is_about_1_for_gaussians_and_larger_otherwise():
    values = [losses.sigreg(torch.randn(512, 32, generator=torch.Generator().manual_seed(s)),
                            generator=torch.Generator().manual_seed(100 + s)).item() for s in range(40)]
    t, omega = losses.epps_pulley_grid()
    expected = ((1 - torch.exp(-t ** 2)) * omega).sum().item()  # E[S |phi_S - phi|^2] = 1 - |phi|^2
    assert abs(expected - 1.05) < 0.01 and abs(sum(values) / len(values) - expected) < 0.06
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 32, generator=g)
    rank8 = torch.randn(512, 8, generator=g) @ torch.randn(8, 32, generator=g) / 8 ** 0.5
    for bad in (3 * z, z + 1, rank8, torch.ones(512, 32)):
        assert losses.sigreg(bad, generator=torch.Generator().manual_seed(5)) > 5


def slow_sigreg(z, directions):
    """The formula written as loops, with complex numbers and torch.trapezoid over [-3, 3]."""
    t = torch.linspace(-3, 3, 33, dtype=torch.float64)
    values = []
    for m in range(directions.shape[1]):
        x = (z.double() @ directions[:, m].double())
        ecf = torch.stack([torch.exp(1j * tj * x).mean() for tj in t])
        integrand = (ecf - torch.exp(-t ** 2 / 2)).abs() ** 2 * torch.exp(-t ** 2 / 2)
        values.append(len(z) * torch.trapezoid(integrand, t))
    return torch.stack(values).mean()


def test_sigreg_equals_a_slow_loop_and_ignores_sample_order():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 8, generator=g) * 1.3 + 0.2
    directions = torch.randn(8, 5, generator=g)
    directions = directions / directions.norm(dim=0)
    fast = losses.sigreg(z, directions=directions)
    torch.testing.assert_close(fast.double(), slow_sigreg(z, directions), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(losses.sigreg(z[torch.randperm(200)], directions=directions), fast)


def test_sigreg_rejects_non_finite_input():
    z = torch.randn(16, 4)
    z[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        losses.sigreg(z)


def _sigreg_rank(rank, world, path, z_all, directions, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    z = z_all.chunk(world)[rank].clone().requires_grad_(True)
    value = losses.sigreg(z, directions=directions)
    value.backward()
    queue.put((rank, value.item(), z.grad.tolist()))  # plain lists outlive the process
    dist.destroy_process_group()


def test_sigreg_under_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
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
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    for rank, value, grad in results:
        assert abs(value - single.item()) < 1e-4
        # DDP divides the summed gradients by the world size: that average must be the 1-process gradient
        torch.testing.assert_close(torch.tensor(grad) / 2, z.grad.chunk(2)[rank], rtol=1e-4, atol=1e-7)


def test_prediction_loss_ignores_padding_and_jepa_loss_mixes_with_one_lambda():
    predictions, targets = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    valid = torch.rand(4, 5) > 0.4
    valid[0, 0] = True
    poisoned = torch.where(valid[..., None], predictions, torch.full_like(predictions, 1e6))
    l2 = losses.prediction_loss(poisoned, targets, valid)
    expected = ((predictions - targets) ** 2).mean(-1)[valid].mean()
    torch.testing.assert_close(l2, expected)
    embeddings = torch.randn(64, 8)
    loss, l2_part, reg = losses.jepa_loss(predictions, targets, valid, embeddings, lam=0.3,
                                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, 0.7 * l2_part + 0.3 * reg)


# ============================================================================= train.py

# A model small enough that a training step takes a few milliseconds.
FAST = ["--model", "nano", "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--pred-dim", "16",
        "--pred-depth", "1", "--pred-heads", "2", "--num-slices", "32", "--batch-size", "16", "--log-every", "1"]


def run_train(out, *args):
    train.main(FAST + ["--out", str(out), *args])
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_short_run_lowers_the_loss_and_writes_its_outputs(tmp_path):
    ckpt = run_train(tmp_path / "run", "--steps", "40", "--lr", "3e-3")
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


def test_every_trainable_parameter_gets_a_gradient_and_is_optimized():
    cfg = train.resolve(train.Config(model="nano", depth=2, batch_size=8, num_slices=16))
    nets = train.build_models(cfg)
    optimizer = train.build_optimizer(cfg, nets[0], nets[1])
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    images = torch.randn(8, 3, 32, 32)
    step_masks = train.sample_step_masks(cfg, 0, (8, 8), 0, 1, torch.device("cpu"))
    loss = train.forward_loss(cfg, nets, images, step_masks, 0, (8, 8))[0]
    loss.backward()
    for module in nets[:2]:
        for name, p in module.named_parameters():
            assert id(p) in optimized, f"{name} is not given to the optimizer"
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
    assert all(p.grad is None and not p.requires_grad for p in nets[2].parameters())  # the target: EMA only


def test_ema_is_updated_after_the_optimizer_step(tmp_path):
    ckpt = run_train(tmp_path / "run", "--steps", "1", "--ema", "0.9", "--warmup", "0")
    cfg = train.resolve(train.Config(**{**ckpt["config"], "resume": None}))
    before = train.build_models(cfg)[0].state_dict()               # context encoder at step 0
    after = ckpt["context_encoder"]
    for name, target in ckpt["target_encoder"].items():
        assert not torch.equal(before[name], after[name]) or before[name].ndim == 0 or name.endswith("bias")
        # target_1 = 0.9 * context_0 + 0.1 * context_1; an EMA before the step would give context_0
        torch.testing.assert_close(target, 0.9 * before[name] + 0.1 * after[name], atol=1e-7, rtol=1e-6)


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
    drop_timing = lambda rows: [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]
    assert drop_timing(read_metrics(tmp_path / "resumed")) == drop_timing(read_metrics(tmp_path / "full"))


def test_a_nan_batch_is_skipped_and_too_many_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    normalize = data.normalize

    def poisoned(images, bad_calls):
        calls["n"] += 1
        out = normalize(images)
        return out * float("nan") if calls["n"] in bad_calls else out

    monkeypatch.setattr(data, "normalize", lambda images: poisoned(images, {3}))
    ckpt = run_train(tmp_path / "one", "--steps", "5")
    assert ckpt["counters"]["skipped_steps"] == 1 and ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["target_encoder"].values())
    calls["n"] = 0
    monkeypatch.setattr(data, "normalize", lambda images: poisoned(images, set(range(3, 100))))
    with pytest.raises(SystemExit) as exit_info:
        run_train(tmp_path / "many", "--steps", "20", "--max-bad-steps", "4")
    assert exit_info.value.code == 1
    assert "non-finite" in capsys.readouterr().err
    saved = torch.load(tmp_path / "many" / "ckpt.pt", weights_only=True)
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["context_encoder"].values())


@pytest.fixture(scope="module")
def nano_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("nano")
    run_train(out / "run", "--steps", "2")
    return out / "run" / "ckpt.pt"


BAD_ARGUMENTS = [
    ["--batch-size", "x"], ["--batch-size", "0"], ["--batch-size", "-4"], ["--lr", "fast"], ["--steps", "0"],
    ["--img-size", "30"], ["--patch-size", "0"], ["--model", "huge"], ["--lam", "2"], ["--precision", "fp16"],
    ["--sigreg-on", "everything"], ["--device", "tpu"], ["--workers", "-1"], ["--no-such-flag"],
    ["--data", "no_such_dataset"], ["--data", "imagenet100", "--data-dir", "/nonexistent"],
    ["--data", "cifar10", "--data-dir", "/nonexistent"], ["--batch-size", "100000"], ["--ema", "1.5"],
    ["--embed-dim", "30", "--num-heads", "4"],
]


@pytest.mark.parametrize("args", BAD_ARGUMENTS, ids=lambda a: " ".join(a))
def test_bad_arguments_get_one_line_and_exit_code_2(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(tmp_path / "run"), "--steps", "1", *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error:"), err


def test_resume_into_another_architecture_and_overwriting_a_run_are_refused(nano_checkpoint, tmp_path, capsys):
    for args in (["--resume", str(nano_checkpoint), "--embed-dim", "64"], []):
        with pytest.raises(SystemExit) as exit_info:
            train.main(FAST[:-2] + ["--steps", "3", "--out", str(nano_checkpoint.parent), *args])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and "already holds a checkpoint" in err
    assert torch.load(nano_checkpoint, weights_only=True)["step"] == 2  # nothing saved was lost


# ============================================================================= faults: signals, kills, processes

def subprocess_env():
    # one thread per process: two processes with two threads each on two cores stall each other
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# Runs train.main with one injected fault, chosen by FAULT=kind:n: SIGKILL itself at the n-th EMA update
# (after the optimizer step, before the EMA), half-way through the n-th torch.save, just before the n-th
# os.replace, or half-way through writing the n-th metrics line.
FAULTY_TRAIN = r"""
import os, signal, sys, torch, train
kind, n = os.environ["FAULT"].split(":")
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
    write_row = train.write_row
    def half_row(path, row):
        if due():
            with open(path, "a") as f:
                f.write('{"step": ' + str(row["step"]))
                f.flush()
            die()
        write_row(path, row)
    train.write_row = half_row
train.main(sys.argv[1:])
"""


def test_killed_at_five_points_and_resumed_ends_exactly_like_an_uninterrupted_run(tmp_path):
    args = FAST + ["--steps", "14", "--ckpt-every", "2"]
    reference = run_train(tmp_path / "reference", "--steps", "14", "--ckpt-every", "2")
    out = str(tmp_path / "killed")
    faults = ["step:3", "save:2", "replace:2", "metrics:3", "step:4"]
    for i, fault in enumerate(faults):
        resume = ["--resume"] if i else []
        result = subprocess.run([sys.executable, "-c", FAULTY_TRAIN, *args, "--out", out, *resume], cwd=HERE,
                                env={**subprocess_env(), "FAULT": fault}, capture_output=True, text=True, timeout=120)
        assert result.returncode == -signal.SIGKILL, (fault, result.stderr[-2000:])
    result = subprocess.run([sys.executable, "train.py", *args, "--out", out, "--resume"], cwd=HERE,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    final = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    for name in ("context_encoder", "target_encoder", "predictor"):
        for key, value in reference[name].items():
            assert torch.equal(value, final[name][key]), (name, key)
    drop_timing = lambda rows: [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]
    assert drop_timing(read_metrics(out)) == drop_timing(read_metrics(tmp_path / "reference"))


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


def torchrun(args, out):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={port}",
               "train.py", *args, "--out", str(out)]
    result = subprocess.run(command, cwd=HERE, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def assert_same_run(a, b, out_a, out_b):
    for name in ("context_encoder", "target_encoder", "predictor"):
        for key, value in a[name].items():
            torch.testing.assert_close(b[name][key], value, atol=2e-5, rtol=1e-4)
    for row_a, row_b in zip(read_metrics(out_a), read_metrics(out_b), strict=True):
        for key in ("loss", "l2", "sigreg"):
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-4), key


def test_two_processes_equal_one_and_resume_across_world_sizes(tmp_path):
    args = FAST + ["--steps", "4", "--ckpt-every", "2"]
    single = run_train(tmp_path / "single", "--steps", "4", "--ckpt-every", "2")
    double = torchrun(args, tmp_path / "double")
    assert_same_run(single, double, tmp_path / "single", tmp_path / "double")
    # a 1-process checkpoint resumed by 2 processes, and a 2-process one resumed by 1
    for source, world in (("single", 2), ("double", 1)):
        out = tmp_path / f"{source}_to_{world}"
        os.makedirs(out)
        os.replace(tmp_path / source / "ckpt_prev.pt", out / "ckpt.pt")      # the step-2 state
        resumed = torchrun(args + ["--resume"], out) if world == 2 else run_train(out, "--steps", "4", "--ckpt-every",
                                                                                 "2", "--resume")
        for name in ("context_encoder", "target_encoder", "predictor"):
            for key, value in single[name].items():
                torch.testing.assert_close(resumed[name][key], value, atol=2e-5, rtol=1e-4)


def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path, capsys):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, {"step": 1, "weights": torch.randn(1000)})
    train.save_checkpoint(path, {"step": 2, "weights": torch.randn(1000)})
    with open(path, "r+b") as f:                                   # flip bytes inside the tensor data
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 16)
    state, used = train.load_checkpoint(path)
    assert state["step"] == 1 and used.endswith("ckpt_prev.pt")
    assert "damaged" in capsys.readouterr().err
