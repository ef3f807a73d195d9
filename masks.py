"""I-JEPA multi-block masks, with a context block that really covers 85-100% of the image.

One sample = one context block + M target blocks on an h x w patch grid (I-JEPA, Assran et al. 2023,
Sec. 3): the encoder sees the context block minus every target, the predictor must produce the
encoder's features at each target.

Shape legend (the project's; see model.py for the rest)
    B   images
    h,w patch grid (rows, columns); N = h * w patches, numbered row-major
    M   target blocks per image (default 4)
    K   visible context patches per image, padded to the batch maximum
    T   patches per target block, padded to the batch maximum

How a sampled (scale, aspect) becomes a whole-patch rectangle -- "the rounding rule"
    A block may only have a shape (bh, bw) that is *admissible*:
        1 <= bh <= h,   1 <= bw <= w,
        scale_min * N <= bh * bw <= scale_max * N,
        aspect_min <= bh / bw <= aspect_max.
    We draw s ~ U(scale_min, scale_max) and, independently, log a ~ U(log aspect_min, log aspect_max).
    The ideal real-valued block is (sqrt(s N a), sqrt(s N / a)); we take the admissible shape nearest
    to it in (log bh, log bw). So every block obeys its bounds *exactly*, on every grid. If no shape
    is admissible the config cannot be met on that grid and we raise ValueError instead of looping.
    The position is uniform over all (h - bh + 1) * (w - bw + 1) placements, last row and column
    included.

What the 85-100% promise means
    It is a property of the context *block*: its area lies in [0.85 N, N] for every sample (the
    reference sampler rounds it to 13 x 13 = 86% on a 14 x 14 grid every time). The *visible*
    context is smaller: four targets of 15-20% each are cut out of it, and by pigeonhole the block
    minus targets cannot stay at 85% (run `python masks.py` for the measured distribution: about
    half of the image on average, 46-48% on 8x8 to 16x16 grids, from under 20% to about 77%).
    On grids up to 12 x 12 no square block of 85-99% exists, so the context block is the whole image.
"""
import argparse
import functools
import json
import math
from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class MaskConfig:
    num_targets: int = 4                     # M; I-JEPA default
    target_scale: tuple = (0.15, 0.2)        # fraction of the N patches per target block
    target_aspect: tuple = (0.75, 1.5)       # bh / bw of a target block
    context_scale: tuple = (0.85, 1.0)       # fraction of the N patches in the context block
    context_aspect: tuple = (1.0, 1.0)       # square context block, as in I-JEPA
    min_keep: int = 4                        # fewest visible context patches a sample may have
    max_tries: int = 20                      # resampling rounds for samples under min_keep


@dataclass
class Masks:
    """Boolean masks over the N patches of each sample (row-major), the canonical form."""
    block: torch.Tensor     # (B, N) the context block, before targets are removed
    targets: torch.Tensor   # (B, M, N) one row per target block
    context: torch.Tensor   # (B, N) what the context encoder sees: block & ~any(targets)


# ----------------------------------------------------------------------------- block shapes

@functools.lru_cache(maxsize=64)
def admissible_shapes(grid, scale, aspect):
    """All (bh, bw) obeying the rounding rule's bounds (see the module docstring).

    Shape: returns a long tensor (A, 2) of the A admissible shapes, sorted by bh then bw. A may be 0.
    """
    h, w = grid
    n = h * w
    eps = 1e-9  # 0.2 * 35 should admit 7, not lose it to float error
    shapes = [(bh, bw) for bh in range(1, h + 1) for bw in range(1, w + 1)
              if scale[0] * n - eps <= bh * bw <= scale[1] * n + eps
              and aspect[0] - eps <= bh / bw <= aspect[1] + eps]
    return torch.tensor(shapes, dtype=torch.long).reshape(-1, 2)


def sample_block_shapes(count, grid, scale, aspect, generator=None):
    """Draw `count` block shapes: scale and log-aspect drawn independently, then snapped.

    Shape: returns (count, 2) long, columns (bh, bw).
    """
    shapes = admissible_shapes(grid, tuple(scale), tuple(aspect))
    n = grid[0] * grid[1]
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(count, generator=generator)
    log_a = math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * torch.rand(count, generator=generator)
    log_area = torch.log(s * n)                                               # (count,)
    ideal_log_h = 0.5 * (log_area + log_a)
    ideal_log_w = 0.5 * (log_area - log_a)
    log_shapes = shapes.double().log()                                        # (A, 2)
    dist = (log_shapes[None, :, 0] - ideal_log_h[:, None]) ** 2 + (log_shapes[None, :, 1] - ideal_log_w[:, None]) ** 2
    return shapes[dist.argmin(1)]                                             # (count, 2)


def place_blocks(shapes, grid, generator=None):
    """Put each block at a uniformly random position, every row and column reachable.

    Shape: shapes (R, 2) -> boolean masks (R, N).
    """
    h, w = grid
    bh, bw = shapes[:, 0], shapes[:, 1]
    top = (torch.rand(len(shapes), generator=generator) * (h - bh + 1)).long()   # in [0, h - bh]
    left = (torch.rand(len(shapes), generator=generator) * (w - bw + 1)).long()
    rows = torch.arange(h)
    cols = torch.arange(w)
    in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])                   # (R, h)
    in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])                 # (R, w)
    in_block = in_rows[:, :, None] & in_cols[:, None, :]                               # (R, h, w)
    return in_block.flatten(1)                                                          # (R, N)


# ----------------------------------------------------------------------------- the sampler

@functools.lru_cache(maxsize=64)
def check_config(grid, cfg):
    """Raise a ValueError that says what to change when `cfg` cannot be met on `grid`.

    A (grid, config) that passes is remembered, so the sampler, called every step, checks each one
    once; one that fails raises again on every call (a raise is never cached). grid is a tuple and
    a MaskConfig is frozen, so both are hashable.
    """
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"mask grid {h}x{w} is empty: image size must be at least one patch")
    for name in ("target", "context"):
        scale, aspect = getattr(cfg, f"{name}_scale"), getattr(cfg, f"{name}_aspect")
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < aspect[0] <= aspect[1]):
            raise ValueError(f"{name}_scale={scale} / {name}_aspect={aspect}: need 0 < min <= max (scale <= 1)")
        if len(admissible_shapes(grid, tuple(scale), tuple(aspect))) == 0:
            raise ValueError(
                f"no {name} block fits a {h}x{w} patch grid with area in [{scale[0]:.2f}, {scale[1]:.2f}] x {h * w} "
                f"patches and aspect in [{aspect[0]}, {aspect[1]}]: use a larger grid (bigger image or smaller "
                f"patch) or widen {name}_scale / {name}_aspect")
    if cfg.num_targets < 1:
        raise ValueError(f"num_targets={cfg.num_targets}: need at least one target block")
    if not 1 <= cfg.min_keep <= h * w:
        raise ValueError(f"min_keep={cfg.min_keep} must lie in [1, {h * w}] for a {h}x{w} grid")


def union(targets):
    """target_1 | ... | target_M. Shape: targets (B, M, N) -> (B, N)."""
    return targets.any(1)


def _sample_once(batch_size, grid, cfg, generator):
    m = cfg.num_targets
    shapes = torch.cat([sample_block_shapes(batch_size, grid, cfg.context_scale, cfg.context_aspect, generator),
                        sample_block_shapes(batch_size * m, grid, cfg.target_scale, cfg.target_aspect, generator)])
    blocks = place_blocks(shapes, grid, generator)                                   # (B + B * M, N), one pass
    return blocks[:batch_size], blocks[batch_size:].view(batch_size, m, -1)          # (B, N), (B, M, N)


def sample_masks(batch_size, grid, generator=None, **overrides):
    """Sample I-JEPA multi-block masks for a batch, vectorised over the batch.

    context = block & ~(target_1 | ... | target_M); samples whose context has fewer than
    `min_keep` patches are redrawn (all of them at once), at most `max_tries` rounds.

    Args: grid = (h, w); overrides are MaskConfig fields (e.g. num_targets=2). A bad config raises
    ValueError; a good one is checked on the first call only (check_config remembers it).
    Shape: returns Masks with block (B, N), targets (B, M, N), context (B, N), all bool.
    """
    cfg = replace(MaskConfig(), **overrides)
    grid = (int(grid[0]), int(grid[1]))
    check_config(grid, cfg)
    block, targets = _sample_once(batch_size, grid, cfg, generator)
    context = block & ~union(targets)
    for _ in range(cfg.max_tries):
        redo = (context.sum(1) < cfg.min_keep).nonzero().flatten()
        if len(redo) == 0:
            return Masks(block, targets, context)
        block[redo], targets[redo] = _sample_once(len(redo), grid, cfg, generator)
        context[redo] = block[redo] & ~union(targets[redo])
    raise ValueError(f"after {cfg.max_tries} tries some samples still see fewer than min_keep={cfg.min_keep} "
                     f"context patches on a {grid[0]}x{grid[1]} grid with {cfg}: lower min_keep or num_targets, "
                     f"or shrink target_scale")


def mask_to_indices(mask, multiple=1):
    """Turn boolean masks into padded index lists, the form the model consumes.

    Each row keeps *all* its True positions, in ascending order; rows are padded to the longest
    row (rounded up to `multiple`, so that few distinct lengths reach torch.compile). Padded
    entries point at patch 0 and are flagged invalid: they must be excluded by the consumer.

    Shape: mask (R, N) bool -> idx (R, X) long, valid (R, X) bool, X = max_r sum(mask[r]) rounded up
    (X is K for context masks, T for target masks).
    """
    counts = mask.sum(1)                                                              # (R,)
    longest = int(counts.max()) if len(counts) else 0
    length = min(mask.shape[1], -(-max(longest, 1) // multiple) * multiple)
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :length]   # True first
    valid = torch.arange(length, device=mask.device) < counts[:, None]               # (R, X)
    return order.masked_fill(~valid, 0), valid


# ----------------------------------------------------------------------------- a look at the masks

def mask_stats(grid, batch_size=10_000, seed=0, **overrides):
    """Fractions of the image covered by the block, the visible context and the targets."""
    masks = sample_masks(batch_size, grid, torch.Generator().manual_seed(seed), **overrides)
    n = grid[0] * grid[1]
    visible = masks.context.sum(1) / n
    return {"grid": f"{grid[0]}x{grid[1]}",
            "block_fraction": {"mean": round(float((masks.block.sum(1) / n).mean()), 3),
                               "min": round(float((masks.block.sum(1) / n).min()), 3),
                               "max": round(float((masks.block.sum(1) / n).max()), 3)},
            "visible_context_fraction": {"mean": round(float(visible.mean()), 3), "min": round(float(visible.min()), 3),
                                         "max": round(float(visible.max()), 3)},
            "target_fraction_per_block": round(float((masks.targets.sum(2) / n).mean()), 3),
            "target_union_fraction": round(float((masks.targets.any(1).sum(1) / n).mean()), 3)}


def draw_masks(masks, grid, path, cell=12, columns=4):
    """Save a PNG: one panel per sample; grey = visible context, colours = targets, black = outside block."""
    from PIL import Image, ImageDraw
    colors = [(230, 80, 60), (60, 150, 230), (250, 190, 40), (90, 200, 110), (170, 90, 210), (240, 120, 200)]
    h, w = grid
    b = masks.block.shape[0]
    rows = -(-b // columns)
    pad = cell
    image = Image.new("RGB", (columns * (w * cell + pad) + pad, rows * (h * cell + pad) + pad), "white")
    draw = ImageDraw.Draw(image)
    for i in range(b):
        x0, y0 = pad + (i % columns) * (w * cell + pad), pad + (i // columns) * (h * cell + pad)
        for p in range(h * w):
            color = (200, 200, 200) if masks.context[i, p] else (25, 25, 25)
            hits = masks.targets[i, :, p].nonzero().flatten()
            if len(hits):
                color = colors[int(hits[-1]) % len(colors)]
            r, c = divmod(p, w)
            draw.rectangle([x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 2, y0 + (r + 1) * cell - 2], fill=color)
    image.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Print the mask defaults and the measured coverage on 8x8, 14x14 and 16x16 grids; with "
                    "--out PATH, also draw 8 samples on a 14x14 grid into the PNG at PATH (grey: visible "
                    "context, black: outside the context block, colours: targets). Writes nothing else.",
        allow_abbrev=False)
    parser.add_argument("--out", metavar="PATH", help="write the figure here (default: no figure)")
    args = parser.parse_args(argv)
    if args.out:
        draw_masks(sample_masks(8, (14, 14), torch.Generator().manual_seed(0)), (14, 14), args.out)
        print(f"wrote {args.out}")
    print("defaults:", {f.name: getattr(MaskConfig(), f.name) for f in fields(MaskConfig)})
    for grid in [(8, 8), (14, 14), (16, 16)]:
        print(json.dumps(mask_stats(grid)))


if __name__ == "__main__":
    main()
