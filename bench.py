"""Benchmark the JEPA training step: GEMM peak, step throughput and MFU, mask sampler, data loading.

    python bench.py                                # tiny ViT, 64 px, patch 8: a few minutes on a 2-core CPU
    python bench.py --presets --batch-size 128     # also ViT-Ti/S/B-16 at 224 px (meant for a GPU)
    python bench.py --gpu-check OUTDIR             # the one-command GPU check, <= 8 min (docs/gpu_check.md)

What is measured, all in one run, so that every ratio compares numbers taken side by side:
 1. peak   a square GEMM at each step's precision, timed in turn with that step's calls (one step, one
           GEMM, ...) -> FLOP/s, the denominator of its MFU: a neighbour's load on a shared machine
           then slows numerator and denominator alike.
 2. step   train.train_step (forward, backward, AdamW, EMA) exactly as train.py calls it, on fixed random
           images with the real masks of each step, per precision x {eager, torch.compile}. Step time is
           the median over the measured steps (robust to a recompile or a busy neighbour); compile time is
           the excess of all steps (warmup included) over that median. FLOPs are counted analytically
           from the architecture and each step's masks (analytic_step_flops): "useful" on the real token
           counts, "executed" on what the kernels compute (padding included). MFU = useful FLOP/s / peak. The
           loss, optimizer and EMA are not counted, as usual for MFU (PaLM, Chowdhery et al. 2022).
 3. masks  masks.sample_masks (vectorised) against a per-sample Python loop of the same sampler.
 4. data   JPEG decode + augmentation per DataLoader worker, and the decoded-cache path (uint8 memmap,
           augmentation on the device), each against the step's img/s: which one limits training?
 5. ijepa  only with --ijepa PATH (a checkout of facebookresearch/ijepa, imported at run time, never
           copied): THEIR training step (src/train.py: target encoder + layer_norm, context encoder on
           apply_masks, predictor, smooth L1, AdamW, EMA) on THEIR modules and MaskCollator, at our
           setting, eager as their code runs, in each --precision (their bf16 path is autocast, without
           their CUDA GradScaler, which bf16 does not need and which is off on CPU), timed like 2., then
           again in turn with each of our steps (eager and compiled, as --compile selects) and the GEMM,
           one call of each in turn, for the ratios; FLOPs per image counted with torch.utils.flop_counter
           (forward + backward), MFU against that GEMM, ours / official img/s, and the context patches
           each keeps per sample (their collator cuts every sample to the batch's smallest). On a CPU
           their code runs in fp32 whatever its config says, so the bf16 group also times, in the same
           turn, their step in fp32 (as their code runs there) and an fp32 GEMM for its MFU.

How to read it: absolute times on a shared machine mean little, ratios from one run do. On CPU keep
torch's threads <= free cores (OMP_NUM_THREADS): oversubscribed cores stall PyTorch ops several-fold.
A CPU without AVX-512 runs torch's bf16 matmuls on a generic kernel, hundreds of times slower than fp32
(runs.slow_cpu_bf16 times it): there the default measures fp32 alone, and an explicit bf16 is refused.
On CPU, memory is the process's peak RSS (torch's allocator is invisible to tracemalloc); it includes
Python and torch themselves. torch.compile times are smaller when inductor's on-disk cache is warm.
"""
import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import data
import masks
import model
import runs
import train

SIZES = ("embed_dim", "depth", "num_heads", "pred_dim", "pred_depth", "pred_heads")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRESET_SETTINGS = [("tiny", 224, 16), ("small", 224, 16), ("base", 224, 16)]


def fail(message):
    """A problem with the command line or its inputs: one line on stderr, exit code 2."""
    print(f"bench.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------- analytic FLOPs of the model

def block_flops(length, dim, mlp_ratio=4.0):
    """Forward multiply-add FLOPs (x2) of one Block on a length-X sequence: the qkv, proj and MLP
    matmuls, 2 X D (3D + D + 2 mlp_ratio D), plus attention scores and weighted sum, 2 * 2 X^2 D."""
    return 2 * length * dim * (4 * dim + 2 * int(dim * mlp_ratio)) + attention_flops(length, dim)


def attention_flops(length, dim):
    """Forward FLOPs of attention's two batched products, Q K^T and P V, on a length-X sequence."""
    return 4 * length * length * dim


def encoder_flops(encoder, num_tokens):
    """Forward FLOPs per image for `num_tokens` kept tokens (patch embedding on all N is not
    counted here; see `patch_embed_flops`)."""
    return len(encoder.blocks) * block_flops(num_tokens, encoder.embed_dim, encoder.mlp_ratio)


def patch_embed_flops(encoder, num_patches):
    return 2 * num_patches * encoder.patch_embed.weight[0].numel() * encoder.embed_dim


def predictor_flops(predictor, num_context, num_targets, embed_dim, num_blocks):
    """Forward FLOPs per image: the context is embedded once, then each of the M rows runs the
    blocks on K + T tokens and projects its T outputs back to D."""
    per_row = (len(predictor.blocks) * block_flops(num_context + num_targets, predictor.pred_dim, predictor.mlp_ratio)
               + 2 * num_targets * predictor.pred_dim * embed_dim)
    return 2 * num_context * embed_dim * predictor.pred_dim + num_blocks * per_row


# ----------------------------------------------------------------------------- timing and memory

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(wall time of one call, with the device's queued work included; the call's result)."""
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - start, value


WARMUP_STEPS = 2  # compiled: step 1 compiles, step 2 usually recompiles for a dynamic size


def time_in_turn(fns, calls, device):
    """Call fns[0](i), fns[1](i), ... for i in range(calls), one call of each in turn, timing every
    call: a neighbour's load on a shared machine then slows them alike, and their ratios hold. Peak
    memory counts from call WARMUP_STEPS on. Returns, per function, (median seconds of the calls
    after WARMUP_STEPS, all times, all results)."""
    times, results = [[] for _ in fns], [[] for _ in fns]
    for i in range(calls):
        if i == WARMUP_STEPS:
            reset_peak_memory(device)
        for fn, fn_times, fn_results in zip(fns, times, results):
            seconds, value = timed(lambda: fn(i), device)
            fn_times.append(seconds)
            fn_results.append(value)
    return [(statistics.median(t[WARMUP_STEPS:]), t, r) for t, r in zip(times, results)]


def median_time(fn, device, reps, warmup=1):
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[0] for _ in range(reps))


def reset_peak_memory(device):
    """CUDA: the allocator's peak. CPU (Linux): writing 5 to clear_refs resets the peak RSS (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    if not os.path.exists("/proc/self/status"):
        return None
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))


# ----------------------------------------------------------------------------- 1. peak

def gemm(device, precision):
    """The reference of every MFU: a square matmul at `precision`, 4096 on a GPU, 2048 on a CPU (a
    few seconds even on one busy core), into a preallocated output. Returns (a function of the call
    index, FLOPs per call, MiB of its three matrices, which a step timed in turn with it does not own)."""
    size = 4096 if device.type == "cuda" else 2048
    a, b, out = (torch.randn(size, size, device=device, dtype=DTYPES[precision]) for _ in range(3))
    return (lambda i: torch.mm(a, b, out=out)), 2 * size ** 3, 3 * a.nbytes / 2 ** 20


# ----------------------------------------------------------------------------- 2. training step

def analytic_step_flops(encoder, predictor, step_masks, num_patches, packed):
    """Model FLOPs per image of one training step, from the architecture and that step's masks.

    Target encoder: forward on all N patches. Context encoder and predictor: forward + backward =
    3x forward (backward computes input and weight gradients), on the real visible tokens and, per
    target block, real context + target tokens. Patch embedding: forward on all N patches in both
    encoders, as computed, plus its weight gradient (no input gradient) in the context encoder.
    `executed` is what the kernels really compute: with `packed` tokens (model.packs_tokens) only
    attention and the predictor's input and output projections run on the padded lengths K and T;
    padded (compiled on a GPU) everything does.

    Args: step_masks = (context_idx, context_valid, target_idx, target_valid) of train.sample_step_masks.
    Returns floats per image: useful, executed, padding_share (of the Transformer FLOPs, patch embedding
    excluded), and useful split into target, context, predictor.
    """
    _, context_valid, _, target_valid = (t.cpu() for t in step_masks)
    batch, padded_k = context_valid.shape
    num_blocks, padded_t, dim = target_valid.shape[0] // batch, target_valid.shape[1], encoder.embed_dim
    k = context_valid.sum(1).long()                                               # (B,) real visible tokens
    t = target_valid.sum(1).long().view(batch, num_blocks)                        # (B, M) real target tokens
    # predictor_flops assumes one T for all M rows: embed the context once, add each row on its own T.
    embed = predictor_flops(predictor, k, 0, dim, 0)                                         # (B,)
    rows = predictor_flops(predictor, k[:, None], t, dim, 1) - embed[:, None]                # (B, M)
    patch_embed = patch_embed_flops(encoder, num_patches)
    split = {"target": encoder_flops(encoder, num_patches) + patch_embed,
             "context": 3 * float(encoder_flops(encoder, k).double().mean()) + 2 * patch_embed,
             "predictor": 3 * float((embed + rows.sum(1)).double().mean())}
    useful = sum(split.values())
    if packed:
        pred_dim, pred_depth = predictor.pred_dim, len(predictor.blocks)
        extra_attention = (len(encoder.blocks) * (attention_flops(padded_k, dim)
                                                  - attention_flops(k, dim).double().mean())
                           + num_blocks * pred_depth * (attention_flops(padded_k + padded_t, pred_dim)
                                                        - attention_flops(k[:, None] + t, pred_dim)
                                                        .double().mean(1).mean()))
        extra_embed = 2 * (padded_k - k.double().mean()) * dim * pred_dim
        extra_proj = num_blocks * 2 * (padded_t - t.double().mean()) * pred_dim * dim
        executed = useful + 3 * float(extra_attention + extra_embed + extra_proj)
    else:
        executed = (encoder_flops(encoder, num_patches) + 3 * encoder_flops(encoder, padded_k)
                    + 3 * predictor_flops(predictor, padded_k, padded_t, dim, num_blocks) + 3 * patch_embed)
    return {"useful": useful, "executed": float(executed),
            "padding_share": 1 - (useful - 3 * patch_embed) / (executed - 3 * patch_embed), **split}


def build_our_step(cfg, steps):
    """train.train_step on `cfg`'s setting as train.py calls it, on fixed random images, and the real
    masks of WARMUP_STEPS + `steps` steps. Returns (step function of the step index, the masks,
    context encoder, predictor)."""
    device = torch.device(cfg.device)
    grid = (cfg.img_size // cfg.patch_size,) * 2
    torch._dynamo.reset()  # no compiled graphs carried over from the previous setting (inductor's disk cache stays)
    context_encoder, predictor, target_encoder = (m.to(device) for m in train.build_models(cfg))
    optimizer = train.build_optimizer(cfg, context_encoder, predictor)
    nets = [context_encoder, predictor, target_encoder]
    nets = [torch.compile(m) for m in nets] if cfg.compile else nets                  # as train.py does
    params = [p for m in (context_encoder, predictor) for p in m.parameters()]
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size,
                         generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    all_masks = [train.sample_step_masks(cfg, step, grid, 0, 1, device) for step in range(WARMUP_STEPS + steps)]
    # The schedules only change lr, wd and momentum values, not the work: keep them constant.
    return (lambda step: train.train_step(cfg, nets, optimizer, params, images, all_masks[step], step, grid,
                                          cfg.ema)), all_masks, context_encoder, predictor


def bench_step(cfg, steps):
    """Time `steps` calls of train.train_step after warmup, in turn with the GEMM of its precision;
    FLOPs come from the masks of those steps, MFU = useful FLOP/s / that GEMM's FLOP/s."""
    print(f"  measuring {label(vars(cfg))} ...", flush=True)
    device, grid, warmup = torch.device(cfg.device), (cfg.img_size // cfg.patch_size,) * 2, WARMUP_STEPS
    step_fn, all_masks, context_encoder, predictor = build_our_step(cfg, steps)
    gemm_fn, gemm_flop, gemm_mb = gemm(device, cfg.precision)
    # A recompile after the warmup lands in compile_s, not in the median. Eager warms up alike.
    (step_s, times, outs), (gemm_s, _, _) = time_in_turn([step_fn, gemm_fn], len(all_masks), device)
    skipped, peak_mem = sum(out is None for out in outs), peak_memory_mb(device)
    packed = model.packs_tokens(device, cfg.compile)
    flops = [analytic_step_flops(context_encoder, predictor, m, grid[0] * grid[1], packed) for m in all_masks[warmup:]]
    mean = {key: statistics.mean(f[key] for f in flops) for key in flops[0]}
    img_s = cfg.batch_size / step_s
    return {"model": cfg.model, "img_size": cfg.img_size, "patch_size": cfg.patch_size, "batch_size": cfg.batch_size,
            "precision": cfg.precision, "compile": cfg.compile, "step_s": step_s, "img_s": img_s,
            "compile_s": sum(times) - len(times) * step_s if cfg.compile else None,
            "useful_flop_per_img": mean["useful"], "executed_flop_per_img": mean["executed"],
            "padding_share": mean["padding_share"], "achieved_flop_s": mean["useful"] * img_s,
            "gemm_flop_s": gemm_flop / gemm_s, "mfu": mean["useful"] * img_s * gemm_s / gemm_flop,
            "peak_mem_mb": None if peak_mem is None else peak_mem - gemm_mb,
            "flop_split": {key: mean[key] / mean["useful"] for key in ("target", "context", "predictor")},
            "padded_shapes": len({(m[0].shape[1], m[2].shape[1]) for m in all_masks}), "skipped_steps": skipped,
            "context_patches": statistics.mean(float(m[1].sum(1).double().mean()) for m in all_masks[warmup:])}


# ----------------------------------------------------------------------------- 3. mask sampling

def loop_sample_masks(batch_size, grid, rng, cfg=masks.MaskConfig()):
    """Reference: the sampler of masks.py as a plain loop over samples and blocks (I-JEPA's collator
    style): same admissible shapes, nearest shape in log space, uniform placement, and a sample whose
    context has fewer than min_keep patches is redrawn whole, at most max_tries times."""
    h, w = grid
    shapes = {name: [tuple(s) for s in masks.admissible_shapes(grid, getattr(cfg, f"{name}_scale"),
                                                                getattr(cfg, f"{name}_aspect")).tolist()]
              for name in ("context", "target")}

    def draw(name):
        scale, aspect = getattr(cfg, f"{name}_scale"), getattr(cfg, f"{name}_aspect")
        area, log_aspect = rng.uniform(*scale) * h * w, rng.uniform(math.log(aspect[0]), math.log(aspect[1]))
        ideal = (0.5 * (math.log(area) + log_aspect), 0.5 * (math.log(area) - log_aspect))
        bh, bw = min(shapes[name], key=lambda s: (math.log(s[0]) - ideal[0]) ** 2 + (math.log(s[1]) - ideal[1]) ** 2)
        mask = torch.zeros(h, w, dtype=torch.bool)
        top, left = int(rng.random() * (h - bh + 1)), int(rng.random() * (w - bw + 1))
        mask[top:top + bh, left:left + bw] = True
        return mask.flatten()

    blocks, targets = [], []
    for _ in range(batch_size):
        for _ in range(cfg.max_tries + 1):
            block, sample_targets = draw("context"), torch.stack([draw("target") for _ in range(cfg.num_targets)])
            if (block & ~sample_targets.any(0)).sum() >= cfg.min_keep:
                break
        else:
            raise ValueError(f"no sample with min_keep={cfg.min_keep} context patches in {cfg.max_tries} tries")
        blocks.append(block)
        targets.append(sample_targets)
    block, targets = torch.stack(blocks), torch.stack(targets)
    return masks.Masks(block, targets, block & ~targets.any(1))


def check_masks(drawn, grid, cfg=masks.MaskConfig()):
    """Invariants both samplers must keep: the context is the block minus the targets, has >= min_keep
    patches, and every block's area lies within its scale bounds."""
    n, eps = grid[0] * grid[1], 1e-9
    assert torch.equal(drawn.context, drawn.block & ~drawn.targets.any(1))
    assert (drawn.context.sum(1) >= cfg.min_keep).all()
    for area, scale in ((drawn.block.sum(1), cfg.context_scale), (drawn.targets.sum(2), cfg.target_scale)):
        assert ((area >= scale[0] * n - eps) & (area <= scale[1] * n + eps)).all()


def bench_masks(cfg, step_s, batch_size=256, grid=(14, 14)):
    """The vectorised sampler against the loop at I-JEPA's setting (batch 256, 14 x 14), and what
    train.py's per-step sampling (masks + index lists) costs at the benchmarked step setting."""
    cpu = torch.device("cpu")
    fast = masks.sample_masks(batch_size, grid, torch.Generator().manual_seed(0))
    slow = loop_sample_masks(batch_size, grid, random.Random(0))
    for drawn in (fast, slow):
        check_masks(drawn, grid)
    visible = [float(d.context.float().mean()) for d in (fast, slow)]
    assert abs(visible[0] - visible[1]) < 0.03, f"the samplers disagree: visible fractions {visible}"
    generator, rng = torch.Generator().manual_seed(1), random.Random(1)
    fast_s = median_time(lambda: masks.sample_masks(batch_size, grid, generator), cpu, reps=20)
    slow_s = median_time(lambda: loop_sample_masks(batch_size, grid, rng), cpu, reps=5)
    device, step_grid = torch.device(cfg.device), (cfg.img_size // cfg.patch_size,) * 2
    per_step_s = median_time(lambda: train.sample_step_masks(cfg, 0, step_grid, 0, 1, device), device, reps=20)
    return {"batch_size": batch_size, "grid": f"{grid[0]}x{grid[1]}", "vectorised_s": fast_s, "loop_s": slow_s,
            "speedup": slow_s / fast_s, "visible_fraction": visible,
            "per_step_s": per_step_s, "share_of_step": per_step_s / step_s}


# ----------------------------------------------------------------------------- 4. data pipeline

def make_jpeg_folder(root, classes=2, per_class=32, size=(500, 375)):
    """ImageNet-sized JPEGs at quality 90: smooth random colour fields plus grain, about 85 KB each
    (ImageNet's mean is about 110 KB); pure noise would make files several times larger."""
    rng = np.random.default_rng(0)
    for cls in range(classes):
        os.makedirs(os.path.join(root, f"class{cls}"))
        for i in range(per_class):
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
            pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 16, (size[1], size[0], 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                os.path.join(root, f"class{cls}", f"{i:03d}.jpg"), quality=90)


def bench_data(device, batch_size, img_size=224, cache_size=256):
    """img/s of decode + augment in one process (= per DataLoader worker), and of the decoded cache:
    read uint8 squares (256 = 224 / 0.875, as for evaluation), then crop, flip and normalise a whole
    batch on the device."""
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(root, "images")
        make_jpeg_folder(folder)
        file_kb = statistics.mean(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs) / 1024
        dataset = data.build_dataset(folder, None, "train", img_size, augment=True)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
        torch.manual_seed(0)
        decode_s = median_time(lambda: [batch for batch in loader], torch.device("cpu"), reps=3)
        path = os.path.join(root, "cache.npy")
        build_s = timed(lambda: data.build_cache(dataset, path, cache_size), torch.device("cpu"))[0]
        cached = torch.utils.data.DataLoader(data.CachedDataset(path, dataset.classes), batch_size=batch_size)

        def cached_epoch():
            for images, _, _ in cached:
                data.normalize(data.random_resized_crop_flip(images.to(device), img_size))

        cached_s = median_time(cached_epoch, device, reps=3)
    return {"images": len(dataset), "jpeg_kb": file_kb, "img_size": img_size, "cache_size": cache_size,
            "decode_img_s_per_worker": len(dataset) / decode_s, "cache_build_img_s": len(dataset) / build_s,
            "cached_img_s": len(dataset) / cached_s}


# ----------------------------------------------------------------------------- 5. official I-JEPA step

# The official mask settings (all four configs/*.yaml agree) and the in1k configs' optimisation values.
# use_bfloat16=False: True would only add their CUDA GradScaler (bf16 needs none; it is off on CPU);
# their bf16 autocast is applied in official_loss.
IJEPA_MASKS = dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5),
                   nenc=1, npred=4, allow_overlap=False)
IJEPA_MIN_KEEP = (10, 4)  # their configs' value, then MaskCollator's own default (see official_collator)
IJEPA_OPTIMIZATION = dict(start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6, warmup=40, num_epochs=300, wd=0.04,
                          final_wd=0.4, ipe_scale=1.0, use_bfloat16=False)
IJEPA_EMA = 0.996  # the start of their momentum schedule, kept constant as in bench_step


def import_ijepa(path):
    """The official modules, imported from the checkout at `path` at run time: bench.py depends on
    them only under --ijepa, and none of their code is copied here."""
    if not os.path.isfile(os.path.join(path, "src", "models", "vision_transformer.py")):
        fail(f"--ijepa {path}: no src/models/vision_transformer.py there; "
                         f"give the root of a facebookresearch/ijepa checkout")
    sys.path.insert(0, os.path.abspath(path))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        from src import helper
        from src.masks.multiblock import MaskCollator
        from src.masks.utils import apply_masks
        from src.models import vision_transformer
        from src.utils.distributed import AllReduce
        from src.utils.logging import grad_logger
        from src.utils.tensors import repeat_interleave_batch
    except ImportError as error:
        fail(f"--ijepa {path}: cannot import the official code: {error}")
    # src.helper sends INFO to stdout on import, and init_model logs the whole model: keep our printout.
    root.handlers[:] = handlers
    root.setLevel(level)
    return types.SimpleNamespace(helper=helper, MaskCollator=MaskCollator, apply_masks=apply_masks,
                                 vit=vision_transformer, AllReduce=AllReduce, grad_logger=grad_logger,
                                 repeat_interleave_batch=repeat_interleave_batch)


def official_collator(ijepa, cfg, batches):
    """Their MaskCollator with their configs' mask settings and the first min_keep it can run with.

    Their target-block loop redraws a block until it has MORE than min_keep patches and, unlike the
    context loop, never relaxes: a batch whose target size rounds to <= min_keep patches loops
    forever (on 8 x 8, 3 x 3 = 9 <= 10 in about half the batches). Batch i's block sizes come from a
    generator seeded with i, so their own size function tells, before any batch is drawn, whether
    one of the first `batches` would hang; then we fall back to the class default, min_keep = 4.
    """
    for min_keep in IJEPA_MIN_KEEP:
        collator = ijepa.MaskCollator(input_size=cfg.img_size, patch_size=cfg.patch_size, min_keep=min_keep,
                                      **IJEPA_MASKS)
        sizes = {collator._sample_block_size(torch.Generator().manual_seed(seed), collator.pred_mask_scale,
                                             collator.aspect_ratio) for seed in range(batches)}
        smallest = min(h * w for h, w in sizes)
        if smallest > min_keep:
            return collator
    fail(f"--ijepa: the official collator would loop forever on a "
                     f"{cfg.img_size // cfg.patch_size}-patch-wide grid (target blocks of {smallest} patches, "
                     f"min_keep tried: {IJEPA_MIN_KEEP}); use a larger --img-size or smaller --patch-size")


def official_loss(ijepa, nets, images, masks_enc, masks_pred, precision):
    """The forward of their train_step (src/train.py). It is a closure inside their main(), so it
    cannot be imported: these are its calls, in its order, on their modules. Their bf16 path
    (use_bfloat16, on in their configs) is torch.cuda.amp.autocast; here autocast on the bench's device."""
    encoder, predictor, target_encoder = nets
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return _official_loss(ijepa, encoder, predictor, target_encoder, images, masks_enc, masks_pred)


def _official_loss(ijepa, encoder, predictor, target_encoder, images, masks_enc, masks_pred):
    with torch.no_grad():
        h = target_encoder(images)
        h = F.layer_norm(h, (h.size(-1),))                                            # their target normalisation
        batch = len(h)
        h = ijepa.apply_masks(h, masks_pred)
        h = ijepa.repeat_interleave_batch(h, batch, repeat=len(masks_enc))
    z = predictor(encoder(images, masks_enc), masks_enc, masks_pred)
    return ijepa.AllReduce.apply(F.smooth_l1_loss(z, h))


def official_step(ijepa, nets, optimizer, schedulers, images, step_masks, precision):
    """Their whole train_step minus DDP and the CUDA timer: lr and wd schedules, forward, backward,
    AdamW, their gradient statistics (one host sync per weight matrix, part of their step), the EMA
    update as they write it, and float(loss)."""
    encoder, _, target_encoder = nets
    for scheduler in schedulers:
        scheduler.step()
    loss = official_loss(ijepa, nets, images, *step_masks, precision)
    loss.backward()
    optimizer.step()
    ijepa.grad_logger(encoder.named_parameters())
    optimizer.zero_grad()
    with torch.no_grad():
        for param_q, param_k in zip(encoder.parameters(), target_encoder.parameters()):
            param_k.data.mul_(IJEPA_EMA).add_((1. - IJEPA_EMA) * param_q.detach().data)
    return float(loss.detach())  # theirs is float(loss): the same host sync, without torch's warning about it


def counted_flops(ijepa, nets, images, step_masks, precision):
    """FLOPs per image of one forward + backward, counted by torch.utils.flop_counter. Their attention
    is plain matmuls, which the counter sees; the optimizer and EMA are not counted, as in 2."""
    with FlopCounterMode(display=False) as counter:
        official_loss(ijepa, nets, images, *step_masks, precision).backward()
    for net in nets[:2]:
        net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(images)


def bench_official(ijepa, cfgs, steps, ours_rows):
    """The official step (eager, as their code runs) on the setting of `cfgs`, our configs of one
    precision (eager and/or compiled), whose bench_step rows are `ours_rows`. Timed as bench_step
    times ours: fixed random images, fresh masks per step from their collator (drawn before timing,
    so not in the step time), median over `steps` after the same warmup; first alone (for its peak
    memory), then in turn with each of our steps and the GEMM, whose times there make the ratios."""
    cfg = dataclasses.replace(cfgs[0], compile=False)
    print(f"  measuring the official I-JEPA step, {label(vars(cfg))} ...", flush=True)
    device, warmup = torch.device(cfg.device), WARMUP_STEPS
    sizes = model.preset(cfg.model, **{k: getattr(cfg, k) for k in SIZES})
    collator = official_collator(ijepa, cfg, batches=warmup + steps)
    torch.manual_seed(cfg.seed)  # their init and their block positions use torch's global generator
    # Built by their helper.init_model, but with OUR preset's predictor width and depth (their configs
    # use 384 x 12 for ViT-H): the comparison is of implementations, not of model sizes. Its heads are
    # the encoder's (init_model), as in our tiny, small and base presets.
    encoder, predictor = ijepa.helper.init_model(device, patch_size=cfg.patch_size, model_name=f"vit_{cfg.model}",
                                                 crop_size=cfg.img_size, pred_depth=sizes["pred_depth"],
                                                 pred_emb_dim=sizes["pred_dim"])
    target_encoder = copy.deepcopy(encoder).requires_grad_(False)
    optimizer, _, *schedulers = ijepa.helper.init_opt(encoder, predictor, iterations_per_epoch=warmup + steps,
                                                      **IJEPA_OPTIMIZATION)
    nets = [encoder, predictor, target_encoder]
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size,
                         generator=torch.Generator().manual_seed(cfg.seed))                # the images of bench_step
    batch = [(image, 0) for image in images]  # their collator collates (image, label) pairs
    all_masks = []
    for _ in range(warmup + steps):
        _, masks_enc, masks_pred = collator(batch)
        all_masks.append(([m.to(device) for m in masks_enc], [m.to(device) for m in masks_pred]))
    images = images.to(device)
    def official_fn(i):
        return official_step(ijepa, nets, optimizer, schedulers, images, all_masks[i], cfg.precision)

    alone_s = time_in_turn([official_fn], len(all_masks), device)[0][0]
    peak_mem = peak_memory_mb(device)                                     # of their step alone
    # The times compared: theirs, each of ours and the GEMM again, one call of each in turn. On a CPU
    # their code runs in fp32 whatever its config says (its autocast is torch.cuda.amp.autocast), so
    # in the bf16 group their step as their code runs it, and an fp32 GEMM for its MFU, join the turn.
    ours_fns = [build_our_step(ours_cfg, steps)[0] for ours_cfg in cfgs]
    gemm_fn, gemm_flop, _ = gemm(device, cfg.precision)
    as_run = "fp32" if device.type == "cpu" and cfg.precision == "bf16" else None
    as_run_fns = [] if as_run is None else [
        lambda i: official_step(ijepa, nets, optimizer, schedulers, images, all_masks[i], as_run), gemm(device, as_run)[0]]
    medians = [median for median, _, _ in time_in_turn([*ours_fns, official_fn, gemm_fn, *as_run_fns],
                                                        len(all_masks), device)]
    ours_times, (step_s, gemm_s, *as_run_times) = medians[:len(ours_fns)], medians[len(ours_fns):]
    # The count depends only on the (K, T) of a batch: one counted pass per distinct pair.
    shapes = [(enc[0].shape[1], pred[0].shape[1]) for enc, pred in all_masks[warmup:]]
    one_batch_per_shape = dict(zip(shapes, all_masks[warmup:]))
    by_shape = {shape: counted_flops(ijepa, nets, images, m, cfg.precision) for shape, m in one_batch_per_shape.items()}
    flop = statistics.mean(by_shape[shape] for shape in shapes)
    img_s, gemm_flop_s = cfg.batch_size / step_s, gemm_flop / gemm_s
    ours = [{"compile": row["compile"], "step_s": ours_s, "img_s": cfg.batch_size / ours_s,
             "mfu": row["useful_flop_per_img"] * cfg.batch_size / ours_s / gemm_flop_s,
             "over_official_img_s": step_s / ours_s} for row, ours_s in zip(ours_rows, ours_times)]
    as_their_code_runs = None
    if as_run is not None:
        as_run_s, as_run_gemm_s = as_run_times
        as_their_code_runs = {"precision": as_run, "step_s": as_run_s, "img_s": cfg.batch_size / as_run_s,
                              "gemm_flop_s": gemm_flop / as_run_gemm_s, "mfu": flop * cfg.batch_size / as_run_s
                              / (gemm_flop / as_run_gemm_s)}
        for timed_here in ours:
            timed_here["over_official_as_run_img_s"] = as_run_s / timed_here["step_s"]
    return {"code": "facebookresearch/ijepa", "model": f"vit_{cfg.model}", "img_size": cfg.img_size,
            "patch_size": cfg.patch_size, "batch_size": cfg.batch_size, "precision": cfg.precision, "compile": False,
            "pred_dim": sizes["pred_dim"], "pred_depth": sizes["pred_depth"], "pred_heads": encoder.num_heads,
            "min_keep": collator.min_keep, "step_s": step_s, "img_s": img_s, "flop_per_img": flop,
            "achieved_flop_s": flop * img_s, "gemm_flop_s": gemm_flop_s, "mfu": flop * img_s / gemm_flop_s,
            "peak_mem_mb": peak_mem, "num_patches": (cfg.img_size // cfg.patch_size) ** 2,
            "context_patches": statistics.mean(enc[0].shape[1] for enc, _ in all_masks[warmup:]),
            "target_patches": statistics.mean(pred[0].shape[1] for _, pred in all_masks[warmup:]),
            "alone_step_s": alone_s, "ours": ours, "as_their_code_runs": as_their_code_runs}


# ----------------------------------------------------------------------------- output

def label(setting):
    """'tiny 64/8 fp32 compile' for a Config's fields or a result row."""
    return (f"{setting['model']} {setting['img_size']}/{setting['patch_size']} {setting['precision']} "
            f"{'compile' if setting['compile'] else 'eager'}")


def rounded(value):
    """Floats to 4 significant digits, to keep the JSON line readable."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {key: rounded(v) for key, v in value.items()}
    return [rounded(v) for v in value] if isinstance(value, list) else value


def si(value, unit=""):
    """1.23e12 -> '1.23 T' + unit."""
    prefixes = ["", "k", "M", "G", "T", "P"]
    power = min(max(int(math.log10(abs(value)) // 3), 0), len(prefixes) - 1) if value else 0
    return f"{value / 1000 ** power:.3g} {prefixes[power]}{unit}"


def print_table(title, header, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    print(f"\n{title}")
    for row in (header, *rows):
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)))


def print_steps(rows):
    print_table("2. training step (train.train_step; FLOPs per image analytic, from each step's masks)",
                ["model", "img/patch", "prec", "mode", "step", "img/s", "useful/img", "executed/img", "pad share",
                 "tgt/ctx/pred", "achieved", "MFU", "compile", "peak mem"],
                [[*label(r).split(), f"{r['step_s'] * 1e3:.0f} ms", f"{r['img_s']:.1f}",
                  si(r["useful_flop_per_img"], "FLOP"), si(r["executed_flop_per_img"], "FLOP"),
                  f"{r['padding_share']:.1%}", "/".join(f"{v:.0%}" for v in r["flop_split"].values()),
                  si(r["achieved_flop_s"], "FLOP/s"), f"{r['mfu']:.1%}",
                  "-" if r["compile_s"] is None else f"{r['compile_s']:.0f} s",
                  "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f} MiB"] for r in rows])
    print("  MFU = useful FLOP/s / the GEMM timed in turn with the step (1.); tgt/ctx/pred = split of the useful FLOPs")
    if any(r["skipped_steps"] for r in rows):
        print("  warning: some steps were non-finite and skipped (no optimizer step): those times are low")


def print_masks(m, step):
    print_table(f"3. mask sampling, batch {m['batch_size']} on a {m['grid']} grid (invariants checked on both)",
                ["sampler", "per batch", "speed-up", "visible"],
                [["masks.sample_masks", f"{m['vectorised_s'] * 1e3:.2f} ms", f"{m['speedup']:.1f}x "
                  f"({'meets' if m['speedup'] >= 20 else 'misses'} the 20x goal)", f"{m['visible_fraction'][0]:.3f}"],
                 ["per-sample Python loop", f"{m['loop_s'] * 1e3:.2f} ms", "1x", f"{m['visible_fraction'][1]:.3f}"]])
    print(f"  train.sample_step_masks at the setting of the fastest step ({label(step)}): "
          f"{m['per_step_s'] * 1e3:.2f} ms = {m['share_of_step']:.2%} of its {step['step_s'] * 1e3:.0f} ms step")


def print_data(result, step):
    workers = step["img_s"] / result["decode_img_s_per_worker"]
    share = step["img_s"] / result["cached_img_s"]
    print_table(f"4. data ({result['images']} JPEGs of 500x375, {result['jpeg_kb']:.0f} KB, -> {result['img_size']} px)"
                f" against the step {label(step)}, {step['img_s']:.1f} img/s",
                ["path", "img/s", "to feed the step"],
                [["decode + augment, per worker", f"{result['decode_img_s_per_worker']:.1f}",
                  f"{workers:.3g} workers"],
                 ["decoded cache + device augment", f"{result['cached_img_s']:.1f}", f"{share:.1%} of step time"],
                 ["cache build (one-off, all cores)", f"{result['cache_build_img_s']:.1f}", "-"]])
    print("  loading limits training when more workers are needed than free cores; on a CPU the workers and the "
          "device augmentation take cores from the step itself")


def print_official(official, ours_rows):
    """Section 5: the official step and each of ours (`ours_rows`, their bench_step rows), as timed in turn."""
    n, ours0, rows = official["num_patches"], ours_rows[0], []
    for row, timed_here in zip(ours_rows, official["ours"]):
        rows.append([f"ours, {'compile' if row['compile'] else 'eager'}", row, timed_here, row["useful_flop_per_img"],
                     "analytic", f"{timed_here['over_official_img_s']:.2f}x"])
    rows.append(["official (src/train.py), eager", official, official, official["flop_per_img"], "flop_counter", "1x"])
    as_run = official["as_their_code_runs"]
    if as_run is not None:
        rows.append([f"official as it runs here ({as_run['precision']})", {**official, "peak_mem_mb": None}, as_run,
                     official["flop_per_img"], "flop_counter", f"{official['step_s'] / as_run['step_s']:.2f}x"])
    setting = f"{official['model']} {official['img_size']}/{official['patch_size']} {official['precision']}"
    print_table(f"5. official I-JEPA step (same setting: {setting}, batch {official['batch_size']}; their "
                f"modules, predictor {official['pred_dim']} wide x {official['pred_depth']} deep as ours; "
                f"all steps and the GEMM timed in turn)",
                ["step", "time", "img/s", "vs official", "FLOP/img", "counted", "achieved", "MFU", "context kept",
                 "peak mem"],
                [[name, f"{t['step_s'] * 1e3:.0f} ms", f"{t['img_s']:.1f}", ratio, si(flop, "FLOP"), counted,
                  si(flop * t["img_s"], "FLOP/s"), f"{t['mfu']:.1%}", f"{row['context_patches']:.1f} of {n}",
                  "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f} MiB"]
                 for name, row, t, flop, counted, ratio in rows])
    print(f"  FLOP/img ours / official = {ours0['useful_flop_per_img'] / official['flop_per_img']:.2f}. Ours: analytic "
          f"on the real tokens (executed: {si(ours0['executed_flop_per_img'], 'FLOP')}); official: "
          f"torch.utils.flop_counter, fwd + bwd. MFU against the GEMM timed in turn with these steps "
          f"({si(official['gemm_flop_s'], 'FLOP/s')})")
    why = ("" if official["min_keep"] == IJEPA_MIN_KEEP[0]
           else f": their configs' {IJEPA_MIN_KEEP[0]} would loop forever here")
    print(f"  their collator (min_keep {official['min_keep']}{why}) cuts every sample's context to the batch's "
          f"smallest, and draws target blocks of {official['target_patches']:.1f} patches; ours keeps every "
          f"visible patch")
    if as_run is not None:
        ratios = ", ".join(f"{'compile' if row['compile'] else 'eager'} {t['over_official_as_run_img_s']:.2f}x"
                           for row, t in zip(ours_rows, official["ours"]))
        print(f"  on a CPU their code runs in {as_run['precision']} whatever its config says (its autocast is "
              f"torch.cuda.amp.autocast): ours / official as it runs here = {ratios} (img/s, in the same turn; "
              f"its MFU against the {as_run['precision']} GEMM of that turn, {si(as_run['gemm_flop_s'], 'FLOP/s')})")


# ----------------------------------------------------------------------------- --gpu-check OUTDIR

# Sizes per device: on cuda the imagenet100 recipe's model and batch (train.DATASET_DEFAULTS) and ViT-B/16
# at batch 128; on a CPU tiny ones, so that the same code runs in a test in about a minute.
CHECK_SIZES = {
    "cuda": dict(steps=[("small", 224, 16, 256), ("base", 224, 16, 128)], precision="bf16", compile=True,
                 bench_steps=10, train_steps=200, cifar_steps=1500, probe=["--data", "cifar10"],
                 synthetic=["--model", "small", "--img-size", "224", "--patch-size", "16", "--batch-size", "256",
                            "--log-every", "10"]),
    "cpu": dict(steps=[("nano", 32, 4, 16)], precision="fp32", compile=False, bench_steps=3, train_steps=40,
                cifar_steps=30, probe=["--data", "synthetic"],
                synthetic=["--model", "nano", "--img-size", "32", "--patch-size", "4", "--batch-size", "16",
                           "--log-every", "1"]),
}
# A resumed run that is not bitwise equal passes within these (GPU kernels with atomics are not
# deterministic): relative L2 distance of every weight tensor, relative difference of the final loss.
RESUME_TOLERANCE = {"weights_rel_l2": 1e-2, "final_loss_rel": 5e-2}


def run_command(command, timeout, log_path):
    """Run `command` in its own session, output to log_path; at `timeout` SIGTERM (train.py saves a
    checkpoint), 60 s later SIGKILL. Returns (exit code, seconds, whether the timeout hit, log tail)."""
    import subprocess
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        timed_out = False
        try:
            process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            process.send_signal(15)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
    with open(log_path) as log:
        tail = log.read()[-2000:]
    return process.returncode, time.perf_counter() - start, timed_out, tail


def read_rows(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [row for _, row in runs.complete_rows(f)]


def check_tests(args, device, out, left):
    """The device-generic tests of test_all.py (parametrised by the `device` fixture) on this device."""
    import re
    expression = args.pytest_k or f"[{device.type}"
    command = [sys.executable, "-m", "pytest", "-q", "test_all.py", "-k", expression, "-rfs", "-p", "no:cacheprovider"]
    code, seconds, timed_out, tail = run_command(command, min(left, 180), os.path.join(out, "tests.log"))
    counts = {kind.rstrip("s") if kind == "errors" else kind: int(n) for n, kind in
              re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", tail.splitlines()[-1] if tail else "")}
    return {"command": " ".join(command), "exit": code, "timed_out": timed_out, "seconds": seconds,
            **{kind: counts.get(kind, 0) for kind in ("passed", "failed", "skipped", "error")},
            "failed_tests": [line.split(" ")[1] for line in tail.splitlines() if line.startswith(("FAILED", "ERROR"))]}


def check_steps(args, device, sizes):
    """The training step at each setting, timed in turn with the GEMM of its precision (bench_step),
    and the official I-JEPA step on the first setting with --ijepa."""
    rows, configs = [], []
    for name, img, patch, batch in sizes["steps"]:
        cfg = train.resolve(train.Config(model=name, img_size=img, patch_size=patch, batch_size=batch,
                                         precision=sizes["precision"], compile=sizes["compile"], device=device.type))
        try:
            rows.append(bench_step(cfg, args.steps if args.steps != 10 else sizes["bench_steps"]))
            configs.append(cfg)
        except torch.OutOfMemoryError:
            rows.append({"model": name, "img_size": img, "patch_size": patch, "batch_size": batch,
                         "error": "out of memory"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"rows": rows}
    if args.ijepa and configs:
        ijepa = import_ijepa(args.ijepa)
        row = next(r for r in rows if "error" not in r)
        result["official_ijepa"] = bench_official(ijepa, [configs[0]], sizes["bench_steps"], [row])
    return result


def check_probe(args, device, sizes, out, left):
    """CIFAR-10 (synthetic data on a CPU) trained with train.py's defaults for it, capped at --cifar-steps
    and time-boxed by --cifar-timeout, then eval_probe.py on the trained and on a random-init encoder."""
    run, deadline = os.path.join(out, "probe_run"), time.perf_counter() + left
    steps = args.cifar_steps or sizes["cifar_steps"]
    where = ["--data-dir", args.data_dir] if args.data_dir and sizes["probe"][1] == "cifar10" else []
    command = [sys.executable, "train.py", *sizes["probe"], *where, "--steps", str(steps), "--device", device.type,
               "--out", run]
    code, seconds, timed_out, tail = run_command(command, min(args.cifar_timeout, left - 60),
                                                 os.path.join(out, "probe_train.log"))
    rows = read_rows(run)
    result = {"command": " ".join(command), "exit": code, "train_s": seconds, "time_boxed": timed_out,
              "steps_done": rows[-1]["step"] if rows else 0, "steps_cap": steps,
              "img_s": statistics.median(r["img_per_s"] for r in rows[1:]) if len(rows) > 1 else None}
    if not os.path.exists(os.path.join(run, "ckpt.pt")):
        result["error"] = f"no checkpoint; train.py said: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
        return result
    limit = [] if device.type == "cuda" else ["--limit", "400", "--k", "5"]
    for tag, extra in (("trained", []), ("random_init", ["--random-init"])):
        path = os.path.join(out, f"probe_{tag}.json")
        command = [sys.executable, "eval_probe.py", "--ckpt", os.path.join(run, "ckpt.pt"), "--device", device.type,
                   "--json", path, *limit, *extra]
        code, seconds, _, tail = run_command(command, max(deadline - time.perf_counter(), 30),
                                             os.path.join(out, f"probe_{tag}.log"))
        if code == 0:
            with open(path) as f:
                probe = json.load(f)
            result[tag] = {"linear_top1": probe["linear_top1"], "knn_top1": probe["knn_top1"], "seconds": seconds}
        else:
            result[tag] = {"error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {code}"}
    if "linear_top1" in result["trained"] and "linear_top1" in result["random_init"]:
        result["linear_gain_points"] = 100 * (result["trained"]["linear_top1"] - result["random_init"]["linear_top1"])
        result["knn_gain_points"] = 100 * (result["trained"]["knn_top1"] - result["random_init"]["knn_top1"])
    return result


def compare_runs(a, b):
    """Final checkpoints of two runs: bitwise equal, or the largest relative L2 distance of a weight."""
    first, second = (torch.load(os.path.join(run, "ckpt.pt"), map_location="cpu", weights_only=True) for run in (a, b))
    equal, worst = True, 0.0
    for name in ("context_encoder", "predictor", "target_encoder"):
        for key, value in first[name].items():
            other = second[name][key]
            equal &= torch.equal(value, other)
            if value.is_floating_point():
                worst = max(worst, float((value - other).double().norm() / value.double().norm().clamp(min=1e-12)))
    return {"steps": [first["step"], second["step"]], "bitwise": bool(equal), "weights_rel_l2": worst}


def check_synthetic(args, device, sizes, out, left):
    """imagenet100-shaped training (its model, image size, batch, lr and EMA from train.DATASET_DEFAULTS;
    compile + bf16 on a GPU) on synthetic images: throughput and whether loss and SIGReg move; then the
    same run killed by SIGTERM half-way and resumed, against the uninterrupted one."""
    import subprocess
    recipe = train.DATASET_DEFAULTS["imagenet100"]
    steps = args.train_steps or sizes["train_steps"]
    mode = ["--compile", "--precision", "bf16"] if device.type == "cuda" else ["--no-compile", "--precision", "fp32"]
    base = [sys.executable, "train.py", "--data", "synthetic", *sizes["synthetic"], "--lr", str(recipe["lr"]),
            "--ema", str(recipe["ema"]), "--ema-end", str(recipe["ema_end"]), *mode, "--steps", str(steps),
            "--device", device.type]
    deadline = time.perf_counter() + left
    full, killed = os.path.join(out, "synthetic_full"), os.path.join(out, "synthetic_killed")
    code, seconds, timed_out, tail = run_command(base + ["--out", full], left / 2, os.path.join(out, "synthetic_full.log"))
    rows = read_rows(full)
    result = {"command": " ".join(base + ["--out", full]), "exit": code, "seconds": seconds, "timed_out": timed_out,
              "steps_done": rows[-1]["step"] if rows else 0}
    if len(rows) < 3:
        result["error"] = tail.strip().splitlines()[-1] if tail.strip() else "no metrics"
        return result
    later = rows[len(rows) // 4:]  # the first rows include compilation
    result.update({"img_s": statistics.median(r["img_per_s"] for r in later),
                   "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
                   "sigreg_first": rows[0]["sigreg"], "sigreg_last": rows[-1]["sigreg"],
                   "effective_rank_last": rows[-1]["effective_rank"]})
    result["loss_moved"] = abs(result["loss_last"] - result["loss_first"]) > 0.01 * abs(result["loss_first"])
    result["sigreg_moved"] = abs(result["sigreg_last"] - result["sigreg_first"]) > 0.01 * abs(result["sigreg_first"])
    if code != 0:
        return result
    # the kill: SIGTERM once half the steps are logged; train.py saves a checkpoint and exits 143
    with open(os.path.join(out, "synthetic_killed.log"), "w") as log:
        process = subprocess.Popen(base + ["--out", killed], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        while process.poll() is None and time.perf_counter() < deadline - 30:
            logged = read_rows(killed)
            if logged and logged[-1]["step"] >= steps // 2:
                process.send_signal(15)
                break
            time.sleep(0.02)
        try:
            process.wait(timeout=max(deadline - time.perf_counter() - 20, 5))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
    kill_exit = process.returncode
    stopped = torch.load(os.path.join(killed, "ckpt.pt"), map_location="cpu", weights_only=True)["step"] \
        if os.path.exists(os.path.join(killed, "ckpt.pt")) else None
    resume = {"kill_exit": kill_exit, "killed_at_step": stopped, "tolerance": RESUME_TOLERANCE}
    result["resume"] = resume
    if kill_exit != 128 + 15 or stopped is None:
        resume["error"] = "the run was not stopped mid-way by SIGTERM"
        return result
    code, seconds, _, tail = run_command(base + ["--out", killed, "--resume"], deadline - time.perf_counter() - 5,
                                         os.path.join(out, "synthetic_resumed.log"))
    resume.update({"resume_exit": code, "resume_s": seconds})
    if code != 0:
        resume["error"] = tail.strip().splitlines()[-1] if tail.strip() else f"exit {code}"
        return result
    resume.update(compare_runs(full, killed))
    a, b = read_rows(full), read_rows(killed)
    strip = [[{k: v for k, v in row.items() if k not in ("img_per_s", "time_s")} for row in rows] for rows in (a, b)]
    resume["metrics_equal"] = strip[0] == strip[1]
    differing = [x["step"] for x, y in zip(*strip) if x != y]
    resume["first_differing_step"] = differing[0] if differing else None
    resume["final_loss_rel"] = abs(a[-1]["loss"] - b[-1]["loss"]) / abs(a[-1]["loss"])
    resume["verdict"] = ("bitwise" if resume["bitwise"] and resume["metrics_equal"] else "within tolerance"
                         if resume["weights_rel_l2"] <= RESUME_TOLERANCE["weights_rel_l2"]
                         and resume["final_loss_rel"] <= RESUME_TOLERANCE["final_loss_rel"] else "differs")
    return result


def summary_lines(result):
    lines = [f"gpu check on {result['device']}, torch {result['torch']}, {result['date']}, "
             f"{result['total_s']:.0f} s of a {result['budget_s']:.0f} s budget"]
    t = result.get("tests", {})
    if "passed" in t:
        lines.append(f"tests ({t['command'].split(' -k ')[1].split(' -rfs')[0]}): {t['passed']} passed, "
                     f"{t['failed']} failed, {t['skipped']} skipped {' '.join(t['failed_tests'])}")
    for row in result.get("steps", {}).get("rows", []):
        if "error" in row:
            lines.append(f"step {row['model']} {row['img_size']}/{row['patch_size']} b{row['batch_size']}: {row['error']}")
            continue
        memory = "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f} MiB"
        lines.append(f"step {label(row)} b{row['batch_size']}: {row['img_s']:.0f} img/s, {row['step_s'] * 1e3:.0f} ms, "
                     f"MFU {row['mfu']:.1%} of a {si(row['gemm_flop_s'], 'FLOP/s')} GEMM, peak {memory}")
    official = result.get("steps", {}).get("official_ijepa")
    if official:
        lines.append(f"official I-JEPA step: {official['img_s']:.0f} img/s, MFU {official['mfu']:.1%}; ours / "
                     f"official img/s {official['ours'][0]['over_official_img_s']:.2f}x")
    p = result.get("probe", {})
    if "linear_gain_points" in p:
        lines.append(f"probe ({p['steps_done']} steps, {p['train_s']:.0f} s{', time-boxed' if p['time_boxed'] else ''}):"
                     f" linear {p['trained']['linear_top1']:.1%} vs random {p['random_init']['linear_top1']:.1%}, "
                     f"k-NN {p['trained']['knn_top1']:.1%} vs {p['random_init']['knn_top1']:.1%}")
    s = result.get("synthetic", {})
    if "img_s" in s:
        lines.append(f"synthetic ({s['steps_done']} steps): {s['img_s']:.0f} img/s, loss {s['loss_first']:.4g} -> "
                     f"{s['loss_last']:.4g}, SIGReg {s['sigreg_first']:.4g} -> {s['sigreg_last']:.4g}")
    r = s.get("resume", {})
    if "verdict" in r:
        lines.append(f"kill at step {r['killed_at_step']} + --resume: {r['verdict']} (max weight rel. L2 "
                     f"{r['weights_rel_l2']:.2e}, final loss rel. {r['final_loss_rel']:.2e})")
    for name in ("tests", "steps", "probe", "synthetic"):
        phase = result.get(name, {})
        problem = phase.get("error") or phase.get("skipped") or phase.get("resume", {}).get("error")
        if problem:
            lines.append(f"{name}: {problem}")
    return lines


def gpu_check(args, device):
    """--gpu-check OUTDIR: every phase in turn within --budget seconds, each one's result written to
    OUTDIR/gpu_check.json as soon as it is there (a run cut short keeps what it measured)."""
    import datetime
    out = args.gpu_check
    if args.ijepa:  # a wrong path fails now, in one line, not after minutes of measurements
        import_ijepa(args.ijepa)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        fail(f"--gpu-check {out}: cannot create the folder ({error.strerror})")
    sizes = CHECK_SIZES[device.type]
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([sys.executable, *sys.argv]), "budget_s": args.budget, "total_s": 0.0}

    def left():
        return args.budget - (time.perf_counter() - start)

    phases = [("tests", lambda: check_tests(args, device, out, left())),
              ("steps", lambda: check_steps(args, device, sizes)),
              ("probe", lambda: check_probe(args, device, sizes, out, min(left(), 0.45 * left() + 60))),
              ("synthetic", lambda: check_synthetic(args, device, sizes, out, left()))]
    for name, phase in phases:
        print(f"gpu check: {name} ({left():.0f} s of the budget left)", flush=True)
        phase_start = time.perf_counter()
        if left() < 20:
            result[name] = {"skipped": "the --budget was spent before this phase"}
        else:
            try:
                result[name] = phase()
            except Exception as error:  # one phase failing must not lose the others' numbers
                result[name] = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[-1:]}"}
        result[name]["phase_s"] = time.perf_counter() - phase_start
        result["total_s"] = time.perf_counter() - start
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(rounded(result), f, indent=1)
        with open(os.path.join(out, "gpu_check.txt"), "w") as f:
            f.write("\n".join(summary_lines(result)) + "\n")
    print("\n".join(summary_lines(result)))
    return result



def parse_args():
    parser = argparse.ArgumentParser(description="Benchmark the JEPA training step (see the docstring of bench.py).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.error = fail
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", default="tiny", choices=list(model.PRESETS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per setting, after warmup")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="only compiled (--compile) or only eager (--no-compile) steps; default: both")
    parser.add_argument("--precision", help="comma-separated, from fp32, bf16; default: both, or fp32 alone on a "
                                            "CPU whose bf16 matmuls are slow (said in the output), where an "
                                            "explicit bf16 is refused")
    parser.add_argument("--presets", action="store_true", help="also tiny, small, base at 224/16 (meant for a GPU)")
    parser.add_argument("--json", help="also write the JSON result to this path")
    parser.add_argument("--skip-data", action="store_true", help="skip the data pipeline (4.)")
    parser.add_argument("--ijepa", metavar="PATH",
                        help="also time the official I-JEPA step (5.), imported from a facebookresearch/ijepa "
                             "checkout at PATH, on the --model/--img-size setting, eager, per --precision, in "
                             "turn with our steps")
    group = parser.add_argument_group("--gpu-check OUTDIR: the one-command GPU check (docs/gpu_check.md)")
    group.add_argument("--gpu-check", metavar="OUTDIR",
                       help="run the device tests, time the compiled bf16 step (ViT-S/16 b256, ViT-B/16 b128), "
                            "train + probe CIFAR-10, train imagenet100-shaped synthetic data with a kill and "
                            "--resume; write OUTDIR/gpu_check.json and gpu_check.txt. With --device cpu: tiny "
                            "sizes (nano, 32 px, synthetic data), a couple of minutes")
    group.add_argument("--budget", type=float, default=480, help="seconds for the whole check; a phase that "
                                                                 "would start after it is skipped and says so")
    group.add_argument("--train-steps", type=int, help="steps of the synthetic runs (default: 200 on cuda, 40 on cpu)")
    group.add_argument("--cifar-steps", type=int, help="--steps cap of the CIFAR-10 run (default: 1500 on cuda, "
                                                        "30 on cpu, where synthetic data replaces CIFAR-10)")
    group.add_argument("--cifar-timeout", type=float, default=120,
                       help="seconds before the CIFAR-10 run gets SIGTERM (it saves a checkpoint, which is probed)")
    group.add_argument("--data-dir", help="CIFAR-10 location (default: as train.py looks it up, e.g. "
                                          "../shared/data/cifar10)")
    group.add_argument("--pytest-k", help="pytest -k expression of the device tests (default: '[cuda' or '[cpu')")
    args = parser.parse_args()
    for name in ("budget", "train_steps", "cifar_steps", "cifar_timeout"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json {args.json}: its folder does not exist (the result is written there at the end)")
    return args


def main():
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device here; use --device cpu")
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if args.gpu_check:
        return gpu_check(args, device)
    precisions = args.precision.split(",") if args.precision else ["fp32", "bf16"]
    bf16_problem = device.type == "cpu" and "bf16" in precisions and runs.slow_cpu_bf16()
    if bf16_problem and args.precision:
        fail(f"--precision {args.precision}: {bf16_problem}, so a bf16 step would "
                         f"take minutes; use --precision fp32 or leave it out")
    if bf16_problem:
        precisions.remove("bf16")
    compiles = [False, True] if args.compile is None else [args.compile]
    settings = [(args.model, args.img_size, args.patch_size)] + (PRESET_SETTINGS if args.presets else [])
    try:  # train.py's Config, which also checks the options; lr, EMA etc. from its synthetic-data defaults
        configs = [train.resolve(train.Config(model=name, img_size=img, patch_size=patch, batch_size=args.batch_size,
                                              precision=p, compile=c, device=device.type))
                   for name, img, patch in settings for p in precisions for c in compiles]
    except ValueError as error:  # runs.UsageError, or a rule of model.py / masks.py
        fail(f"{error}")
    ijepa = None
    if args.ijepa:  # checked before any measurement, so a wrong path fails at once
        ijepa = import_ijepa(args.ijepa)
        if not hasattr(ijepa.vit, f"vit_{args.model}"):
            fail(f"--ijepa: the official code has no vit_{args.model}; "
                             f"use --model tiny, small or base")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as train.py: "fp32" matmuls run in TF32, peak included
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0], "torch": torch.__version__}
    print(f"device {result['device']}, {result['threads']} torch threads, load average {result['load_avg_1min']:.2f} "
          f"on {os.cpu_count()} cores, torch {torch.__version__}")
    if bf16_problem:
        result["bf16_skipped"] = bf16_problem
        print(f"bf16 skipped: {bf16_problem}")

    result["steps"] = [bench_step(cfg, args.steps) for cfg in configs]
    print_table("1. peak: square GEMM at the step's precision, timed in turn with its steps (median)",
                ["model", "img/patch", "prec", "mode", "GEMM"],
                [[*label(r).split(), si(r["gemm_flop_s"], "FLOP/s")] for r in result["steps"]])
    print_steps(result["steps"])
    main_rows = result["steps"][:len(precisions) * len(compiles)]  # the --model/--img-size setting
    fastest = min(main_rows, key=lambda r: r["step_s"])
    result["masks"] = bench_masks(configs[result["steps"].index(fastest)], fastest["step_s"])
    print_masks(result["masks"], fastest)

    if not args.skip_data:
        result["data"] = bench_data(device, args.batch_size)
        vit_s = [r for r in result["steps"] if (r["model"], r["img_size"], r["patch_size"]) == ("small", 224, 16)]
        print_data(result["data"], max(vit_s or main_rows, key=lambda r: r["img_s"]))

    if ijepa is not None:  # per precision, the official step against each of our modes
        result["official_ijepa"] = []
        for precision in precisions:
            cfgs, rows = zip(*[(cfg, row) for cfg, row in zip(configs, main_rows) if cfg.precision == precision])
            result["official_ijepa"].append(bench_official(ijepa, cfgs, args.steps, rows))
            print_official(result["official_ijepa"][-1], rows)

    line = json.dumps(rounded(result))
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
