"""Train an image JEPA: context encoder + predictor learn by one loss, the target encoder follows by EMA.

    python train.py                                   # synthetic images, nano ViT, a few CPU minutes
    python train.py --data cifar10                    # nano ViT, 4,000 steps on a CPU; tiny, 100 epochs on a GPU
    python train.py --data imagenet100                # ViT-S/16 at 224 px on one GPU
    torchrun --nproc_per_node=N train.py ...          # several GPUs (DDP)

One step (I-JEPA, Assran et al. 2023, with LeJEPA's SIGReg, Balestriero & LeCun 2025):
    1. sample masks: a context block with M target blocks cut out            (masks.py)
    2. target encoder (no grad) encodes all N patches -> features y at the targets
    3. context encoder encodes the visible patches; the predictor maps them to p at the targets
    4. loss = (1 - lam) * L2(p, y) + lam * SIGReg(context embeddings)           (losses.py)
    5. AdamW step on context encoder + predictor, THEN the EMA update of the target encoder.

Shape legend (model.py has it whole): B images per process, N patches, K visible context tokens (padded),
M target blocks, R = B * M predictor rows, T tokens per target block (padded), D width, L slicing directions.
"""
import copy
import dataclasses
import math
import signal
import sys
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import losses
import masks
import model
import runs

# ----------------------------------------------------------------------------- configuration

# The recipes: per-dataset defaults for the Config fields left at None; on a CPU, CPU_RECIPES replace
# a part (CIFAR-10: the nano ViT for a fixed number of steps, to fit 30 minutes on 2 cores). measured=True
# means run end to end over 3 seeds against the random-init encoder (docs/results.md). ViT-S/16 at 224 px
# for 100 epochs follows LeJEPA's ImageNet-100 runs; 32 px images use patch 4, as is usual for ViTs on
# CIFAR. Short runs hold the EMA momentum at 0.99: rising to 1, the target would stop following early.
DATASET_DEFAULTS = {
    "synthetic": dict(model="nano", img_size=32, patch_size=4, batch_size=64, epochs=2, lr=2e-3, ema=0.99,
                      ema_end=0.99, measured=True),
    "cifar10": dict(model="tiny", img_size=32, patch_size=4, batch_size=256, epochs=100, lr=1e-3, ema=0.996,
                    ema_end=1.0, measured=False),
    "imagenet100": dict(model="small", img_size=224, patch_size=16, batch_size=256, epochs=100, lr=5e-4,
                        ema=0.996, ema_end=1.0, measured=False),
}
DATASET_DEFAULTS["folder"] = DATASET_DEFAULTS["imagenet100"]
CPU_RECIPES = {
    "cifar10": dict(model="nano", batch_size=64, steps=4000, lr=3e-3, ema=0.99, ema_end=0.99, measured=True),
}


@dataclasses.dataclass
class Config:
    # data
    data: str = "synthetic"         # synthetic | cifar10 | imagenet100 | a path to an image folder
    data_dir: str = None            # dataset location; see data.py for where each dataset is looked for
    img_size: int = None            # None = the dataset's default (DATASET_DEFAULTS)
    patch_size: int = None
    workers: int = None             # DataLoader processes; None = min(8, CPU cores) on a GPU, 0 on CPU
    cache: bool = False             # decode the training images once into a uint8 memmap; crop + flip on device
    # model (None = the preset's value, model.PRESETS)
    model: str = None
    embed_dim: int = None
    depth: int = None
    num_heads: int = None
    pred_dim: int = None
    pred_depth: int = None
    pred_heads: int = None
    # loss: (1 - lam) * L2 + lam * SIGReg; SIGReg has no factor S, so lam does not scale with the batch
    lam: float = 0.1                # the λ sweep's value (docs/results.md); LeJEPA uses 0.05 on pooled views
    num_slices: int = 256
    sigreg_on: str = "tokens"       # tokens | pooled: which context embeddings SIGReg tests
    # optimisation (AdamW; schedules as in I-JEPA: warmup + cosine lr, cosine wd 0.04 -> 0.4, ema 0.996 -> 1)
    batch_size: int = None          # global batch, split over processes under torchrun
    epochs: int = None
    steps: int = None               # optimizer steps; overrides epochs when given
    lr: float = None                # peak learning rate
    min_lr: float = 1e-6            # end of the cosine
    warmup: float = 0.1             # fraction of the steps spent in linear warmup
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    ema: float = None               # EMA momentum at step 0 (0 = target is a stop-grad copy)
    ema_end: float = None           # EMA momentum at the last step
    clip_grad: float = None         # clip the gradient's global norm to this (None = no clipping)
    max_bad_steps: int = 10         # non-finite steps in a row before the run stops
    # runtime
    precision: str = None           # bf16 | fp32; None = bf16 on CUDA, fp32 elsewhere
    compile: bool = False
    device: str = "auto"            # auto | cpu | cuda | mps
    seed: int = 0
    out: str = None                 # None = runs/default, or the folder of the run --resume PATH continues
    resume: str = None              # --resume: continue OUT/ckpt.pt; --resume PATH: that checkpoint
    ckpt_every: int = 500           # optimizer steps between checkpoints (and one at the end)
    log_every: int = 50


# What None means for the fields whose None is not "the dataset's or the preset's value" (--help).
NONE_MEANS = {"data_dir": "looked up (see data.py)", "workers": "min(8, CPU cores) on a GPU, 0 on CPU",
              "steps": "the recipe's if it sets steps, else --epochs decides", "clip_grad": "none: no clipping",
              "precision": "bf16 on CUDA, fp32 elsewhere", "out": "runs/default, or --resume PATH's folder"}


def recipes_text():
    """The recipes as --help lists them, each marked measured or not."""
    lines = ["recipes (the defaults of each --data; a flag you give wins; --device mps takes the GPU ones):"]
    for device, table in (("", DATASET_DEFAULTS), (" on a CPU", CPU_RECIPES)):
        for name, values in table.items():
            shown = ", ".join(f"{k}={v}" for k, v in values.items() if k != "measured")
            status = "measured, 3 seeds (docs/results.md)" if values["measured"] else "UNMEASURED"
            lines.append(f"  {name}{device}: {shown}  [{status}]")
    return "\n".join(lines)


def recipe(cfg):
    """The defaults for cfg's dataset on cfg's device (DATASET_DEFAULTS, then CPU_RECIPES on a CPU), with
    the recipe's name. A recipe's fixed --steps gives way when the command line sets --epochs."""
    kind = cfg.data if cfg.data in ("synthetic", "cifar10", "imagenet100") else "folder"
    chosen = dict(DATASET_DEFAULTS[kind], name=kind)
    if cfg.device == "cpu" and kind in CPU_RECIPES:
        chosen.update(CPU_RECIPES[kind], name=f"{kind} CPU")
    if cfg.epochs is not None:
        chosen.pop("steps", None)
    return chosen


def resolve(cfg):
    """Fill the None fields from the dataset and device defaults, then check every value."""
    cfg = dataclasses.replace(cfg, device=runs.pick_device(cfg.device), out=cfg.out or runs.default_out(cfg.resume))
    defaults = {k: v for k, v in recipe(cfg).items() if k not in ("measured", "name")}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    if cfg.workers is None:
        cfg.workers = runs.default_workers(cfg.device)
    if cfg.precision is None:
        cfg.precision = "bf16" if cfg.device == "cuda" else "fp32"
    runs.check_values(cfg)
    with torch.device("meta"), torch.random.fork_rng(devices=[]):  # model.py checks its rules; meta costs no memory
        build_models(cfg)
    masks.check_config((cfg.img_size // cfg.patch_size,) * 2, masks.MaskConfig())
    return cfg


# ----------------------------------------------------------------------------- schedules

def cosine(step, total, start, end):
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


def schedules(cfg, step, total):
    """Learning rate (linear warmup, then cosine to min_lr), weight decay (cosine up, I-JEPA) and
    EMA momentum (linear from ema to ema_end, I-JEPA) at optimizer step `step` of `total`."""
    warmup = int(cfg.warmup * total)
    lr = cfg.lr * (step + 1) / warmup if step < warmup else cosine(step - warmup, total - warmup, cfg.lr, cfg.min_lr)
    weight_decay = cosine(step, total, cfg.weight_decay, cfg.weight_decay_end)
    momentum = cfg.ema + (cfg.ema_end - cfg.ema) * step / max(total, 1)
    return lr, weight_decay, momentum


# ----------------------------------------------------------------------------- model and optimizer

def build_models(cfg):
    """Context encoder, predictor and the target encoder (a frozen copy, updated only by EMA)."""
    torch.manual_seed(cfg.seed)
    encoder = model.build_encoder(cfg.model, cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads)
    predictor = model.build_predictor(cfg.model, encoder.embed_dim, cfg.pred_dim, cfg.pred_depth, cfg.pred_heads)
    return encoder, predictor, copy.deepcopy(encoder).requires_grad_(False)


def build_optimizer(cfg, context_encoder, predictor):
    """AdamW over every trainable parameter; no weight decay on biases, norms and the mask token
    (all the 1-d parameters), as in I-JEPA. The wd of group 0 follows the schedule."""
    params = [p for m in (context_encoder, predictor) for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=True)


@torch.no_grad()
def ema_update(target_encoder, context_encoder, momentum):
    """target <- m * target + (1 - m) * context. Called AFTER optimizer.step(), so the target
    follows the weights the step just produced."""
    target = list(target_encoder.parameters())
    source = [p.detach() for p in context_encoder.parameters()]
    torch._foreach_lerp_(target, source, 1.0 - momentum)


# ----------------------------------------------------------------------------- one training step

class Loss(NamedTuple):
    loss: torch.Tensor                 # (1 - lam) * l2 + lam * sigreg
    l2: torch.Tensor
    sigreg: torch.Tensor
    pooled_targets: torch.Tensor       # (B, D) target features averaged over patches, for the health metrics


# What train_step returns: the Loss and the gradient's norm before clipping.
StepResult = NamedTuple("StepResult", [(name, torch.Tensor) for name in (*Loss._fields, "grad_norm")])


def step_generator(cfg, step, salt):
    """A CPU generator seeded by (seed, step, salt): masks (salt 0) and SIGReg slices (salt 1) are the
    same on every rank and after a resume."""
    return torch.Generator().manual_seed(runs.mixed_seed(cfg.seed, (step, 1_000_003), (salt, 4)))


def sample_step_masks(cfg, step, grid, rank, world, device):
    """Masks for the global batch, of which this process takes its rows (so N processes see the
    masks of one), as padded index lists. Under --compile, lengths are rounded up to a multiple of
    8 so that torch.compile meets only a few distinct shapes; eager mode pads to the exact maximum."""
    drawn = masks.sample_masks(cfg.batch_size, grid, step_generator(cfg, step, 0))
    local = cfg.batch_size // world
    context = drawn.context[rank * local:(rank + 1) * local]                           # (B, N)
    targets = drawn.targets[rank * local:(rank + 1) * local].flatten(0, 1)             # (R, N)
    multiple = 8 if cfg.compile else 1
    context_idx, context_valid = masks.mask_to_indices(context, multiple)             # (B, K)
    target_idx, target_valid = masks.mask_to_indices(targets, multiple)               # (R, T)
    return [t.to(device, non_blocking=True) for t in (context_idx, context_valid, target_idx, target_valid)]


def forward_loss(cfg, nets, images, step_masks, step, grid):
    """Steps 2-4 of the module docstring: a Loss, or None when the context embeddings are not finite."""
    context_encoder, predictor, target_encoder = nets
    context_idx, context_valid, target_idx, target_valid = step_masks
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    with autocast:
        with torch.no_grad():
            target_features = target_encoder(images)                                   # (B, N, D)
            rows = torch.arange(images.shape[0], device=images.device)
            rows = rows.repeat_interleave(target_idx.shape[0] // images.shape[0])[:, None]
            targets = target_features[rows, target_idx]                                # (R, T, D)
        context = context_encoder(images, context_idx, context_valid)                  # (B, K, D)
        predictions = predictor(context, context_idx, context_valid, target_idx, target_valid, grid)  # (R, T, D)
    if cfg.sigreg_on == "tokens":
        embeddings = context[context_valid]                                            # (sum K, D)
    else:
        embeddings = pool_tokens(context, context_valid)                               # (B, D)
    if not runs.all_ranks_true(torch.isfinite(embeddings).all()):
        return None
    # The slices are drawn here, outside any compiled graph (a seeded CPU generator breaks a graph).
    directions = losses.slice_directions(embeddings.shape[1], cfg.num_slices, step_generator(cfg, step, 1),
                                         embeddings.device)                                   # (D, L)
    # Under --compile the loss is compiled too: SIGReg's cosines and sines, their sums and the L2 error
    # run in inductor's fused kernels rather than one eager op each.
    jepa_loss = runs.compiled(losses.jepa_loss) if cfg.compile else losses.jepa_loss
    loss, l2, regularizer = jepa_loss(predictions, targets, target_valid, embeddings, cfg.lam,
                                      directions=directions)
    return Loss(loss, l2, regularizer, target_features.float().mean(1))               # pooled: (B, D)


def pool_tokens(tokens, valid):
    """The mean of each image's real tokens: padding is selected away, never multiplied (0 * inf is NaN).
    Shape: tokens (B, K, D), valid (B, K) -> (B, D)."""
    kept = torch.where(valid[..., None], tokens, 0.0)                                   # (B, K, D)
    return kept.sum(1) / valid.sum(1, keepdim=True)


def train_step(cfg, nets, optimizer, params, images, step_masks, step, grid, momentum):
    """Steps 2-5 of the module docstring: a StepResult, or None when a NaN/Inf appeared: then
    nothing is updated, weights nor EMA."""
    context_encoder, predictor, target_encoder = (runs.unwrap(m) for m in nets)
    out = forward_loss(cfg, nets, images, step_masks, step, grid)
    if out is not None:
        out.loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if out is None or not runs.all_ranks_true(torch.isfinite(out.loss) & torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return None
    if cfg.clip_grad is not None:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.clip_grad, grad_norm)    # grad_norm: before clipping
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_update(target_encoder, context_encoder, momentum)
    return StepResult(*out, grad_norm)


# ----------------------------------------------------------------------------- the run

def train(cfg):
    """Run the training described by `cfg` (already resolved). Returns the output folder."""
    rank, world = runs.setup_distributed(cfg)
    device = runs.process_device(cfg, rank)
    dataset = runs.training_set(cfg)                    # the data's checks come before the run folder's
    total = cfg.steps or cfg.epochs * (len(dataset) // cfg.batch_size)
    checkpoint, source = runs.open_run(cfg, total, rank)
    dataset = runs.cached_training_set(cfg, dataset, rank, world) if cfg.cache else dataset
    context_encoder, predictor, target_encoder = (m.to(device) for m in build_models(cfg))
    optimizer = build_optimizer(cfg, context_encoder, predictor)
    state = dict(context_encoder=context_encoder, predictor=predictor, target_encoder=target_encoder,
                 optimizer=optimizer)
    progress = runs.restore(checkpoint, source, state, cfg.out, rank)
    nets = [DistributedDataParallel(m) if world > 1 else m for m in (context_encoder, predictor)] + [target_encoder]
    nets = [torch.compile(m) for m in nets] if cfg.compile else nets
    params = [p for m in (context_encoder, predictor) for p in m.parameters()]
    grid = (cfg.img_size // cfg.patch_size,) * 2
    if rank == 0:
        runs.announce(cfg, recipe(cfg)["name"], len(dataset), total, (context_encoder, predictor), device, world)
    with runs.Stop.handling(), tqdm(total=total, initial=progress.step, disable=rank != 0, dynamic_ncols=True) as bar:
        for epoch, images in runs.batches(cfg, dataset, progress, total, rank, world, device):
            lr, weight_decay, momentum = schedule = schedules(cfg, progress.step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.param_groups[0]["weight_decay"] = weight_decay
            images = runs.device_batch(cfg, images, progress.step, rank, world, device)          # (B, 3, H, W)
            step_masks = sample_step_masks(cfg, progress.step, grid, rank, world, device)
            out = train_step(cfg, nets, optimizer, params, images, step_masks, progress.step, grid, momentum)
            if out is None:
                runs.skipped_step(cfg, state, progress, rank, world)
            else:
                progress.bad_in_row, progress.step = 0, progress.step + 1
                progress.images_seen += images.shape[0] * world
                bar.set_postfix(loss=f"{out.loss.item():.4f}", refresh=False)
                bar.update(1)
                runs.estimate(progress, total)
                if progress.step % cfg.log_every == 0 or progress.step == total:
                    runs.log_step(cfg, progress, epoch, out, schedule, rank)
            stop = runs.Stop.requested(device)  # also during a run of skipped steps
            if stop or (out is not None and (progress.step % cfg.ckpt_every == 0 or progress.step == total)):
                runs.save_run(cfg, state, progress, rank, world)
            if progress.step == total or stop:
                break
    runs.finish(cfg, progress, total, rank)
    del nets  # see runs.teardown
    runs.teardown()
    return cfg.out


def main(argv=None):
    args = runs.config_parser(Config, NONE_MEANS, recipes_text()).parse_args(argv)
    try:
        with runs.removing_new_empty_folders():
            train(resolve(Config(**vars(args))))
    except (RuntimeError, MemoryError) as error:  # out of memory, or re-raised: other errors are bugs
        runs.exit_usage(runs.out_of_memory(args, error))
    except (ValueError, data.DataError) as error:  # a runs.UsageError is a ValueError
        # An error raised in a DataLoader worker arrives wrapped: its own message is the last line.
        runs.exit_usage(str(error).strip().splitlines()[-1].removeprefix("data.DataError: "))
    except FloatingPointError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # before the training loop or after it (inside it, Stop saves a checkpoint)
        print("train.py: interrupted; checkpoints already written are kept", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
