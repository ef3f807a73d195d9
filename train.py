"""Train an image JEPA: context encoder + predictor learn by one loss, the target encoder follows by EMA.

    python train.py                                   # synthetic images, nano ViT, a few CPU minutes
    python train.py --data cifar10 --data-dir DIR     # tiny ViT at 32 px, patch 4
    python train.py --data imagenet100                # ViT-S/16 at 224 px on one GPU
    torchrun --nproc_per_node=N train.py ...          # several GPUs (DDP)

One step (I-JEPA, Assran et al. 2023, with LeJEPA's SIGReg, Balestriero & LeCun 2025):
    1. sample masks: a context block with M target blocks cut out            (masks.py)
    2. target encoder (no grad) encodes all N patches -> features y at the targets
    3. context encoder encodes the visible patches; the predictor maps them to p at the targets
    4. loss = (1 - lam) * L2(p, y) + lam * SIGReg(context embeddings)           (losses.py)
    5. AdamW step on context encoder + predictor, THEN the EMA update of the target encoder.

Shape legend: B batch (per process), N patches, K visible context tokens (padded), M target blocks,
R = B * M predictor rows, T tokens per target block (padded), D encoder width.
"""
import argparse
import copy
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import losses
import masks
import model

# ----------------------------------------------------------------------------- configuration

# The recipes: per-dataset defaults, used where a Config field is left at None. A recipe marked
# measured=True was run end to end with 3 seeds and probed against the random-init encoder
# (docs/results.md); the others are starting points nobody has run yet: ViT-S/16 at 224 px and 100
# epochs for ImageNet-100 follow LeJEPA's ImageNet-100 runs, and 32 px images use patch 4 (an 8 x 8
# grid), the usual choice for ViTs on CIFAR. CPU_RECIPES replace a recipe on a machine without a GPU:
# CIFAR-10 on a CPU fits 30 minutes on 2 cores by training the nano ViT for a fixed number of steps.
# The EMA momentum is held at 0.99 in the short recipes: rising to 1, the target stops following the
# context encoder before such a run ends.
DATASET_DEFAULTS = {
    "synthetic": dict(model="nano", img_size=32, patch_size=4, batch_size=64, epochs=2, lr=2e-3, ema=0.99,
                      ema_end=0.99, measured=True),
    "cifar10": dict(model="tiny", img_size=32, patch_size=4, batch_size=256, epochs=100, lr=1e-3, ema=0.996,
                    ema_end=1.0, measured=False),
    "imagenet100": dict(model="small", img_size=224, patch_size=16, batch_size=256, epochs=100, lr=5e-4,
                        ema=0.996, ema_end=1.0, measured=False),
    "folder": dict(model="small", img_size=224, patch_size=16, batch_size=256, epochs=100, lr=5e-4, ema=0.996,
                   ema_end=1.0, measured=False),
}
CPU_RECIPES = {
    "cifar10": dict(model="nano", batch_size=64, steps=3200, lr=2e-3, ema=0.99, ema_end=0.99, measured=True),
}
SIZES = ("embed_dim", "depth", "num_heads", "pred_dim", "pred_depth", "pred_heads")
ARCHITECTURE = ("model", "img_size", "patch_size", *SIZES)
TRAJECTORY = ("data", "batch_size", "epochs", "steps", "lr", "lam", "seed", "ema", "sigreg_on", "clip_grad")


@dataclass
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
    # loss: (1 - lam) * L2 + lam * SIGReg; one lam for every dataset, batch and resolution
    lam: float = 0.05
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
    out: str = "runs/default"
    resume: str = None              # --resume: continue OUT/ckpt.pt; --resume PATH: that checkpoint
    ckpt_every: int = 500           # optimizer steps between checkpoints (and one at the end)
    log_every: int = 50


# What None means for the fields whose None is not "the dataset's or the preset's value" (--help).
NONE_MEANS = {"data_dir": "looked up (see data.py)", "workers": "min(8, CPU cores) on a GPU, 0 on CPU",
              "steps": "none: --epochs decides", "clip_grad": "none: no clipping",
              "precision": "bf16 on CUDA, fp32 elsewhere"}


class UsageError(ValueError):
    """A problem with the command line or its inputs: reported in one line, exit code 2."""


def build_parser():
    parser = argparse.ArgumentParser(description="Train an image JEPA; every flag is a field of Config.",
                                     epilog=recipes_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        kind = field.type
        none_means = NONE_MEANS.get(field.name, "the dataset's or preset's default")
        shown = none_means if field.default is None else field.default
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        elif field.name == "resume":
            parser.add_argument(flag, nargs="?", const="", default=None, metavar="PATH",
                                help="continue OUT/ckpt.pt, or the checkpoint PATH")
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=f"default: {shown}")
    parser.error = lambda message: exit_usage(message)
    return parser


def recipes_text():
    """The recipes as --help lists them, each marked measured or not."""
    lines = ["recipes (the defaults of each --data; a flag you give wins):"]
    for device, table in (("", DATASET_DEFAULTS), (" on a CPU", CPU_RECIPES)):
        for name, values in table.items():
            shown = ", ".join(f"{k}={v}" for k, v in values.items() if k != "measured")
            status = "measured, 3 seeds (docs/results.md)" if values["measured"] else "UNMEASURED"
            lines.append(f"  {name}{device}: {shown}  [{status}]")
    return "\n".join(lines)


def exit_usage(message):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def data_kind(name):
    return name if name in ("synthetic", "cifar10", "imagenet100") else "folder"


def recipe(cfg):
    """The defaults for cfg's dataset on cfg's device (DATASET_DEFAULTS, then CPU_RECIPES on a CPU).
    A recipe's fixed --steps gives way when the command line sets --epochs."""
    kind = data_kind(cfg.data)
    chosen = dict(DATASET_DEFAULTS[kind])
    if cfg.device == "cpu":
        chosen.update(CPU_RECIPES.get(kind, {}))
    if cfg.epochs is not None:
        chosen.pop("steps", None)
    return chosen


def resolve(cfg):
    """Fill the None fields from the dataset and device defaults, then check every value."""
    if cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device="cuda" if torch.cuda.is_available()
                                  else "mps" if torch.backends.mps.is_available() else "cpu")
    defaults = {k: v for k, v in recipe(cfg).items() if k != "measured"}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    if cfg.workers is None:  # on a CPU, loader processes would take the cores the model needs
        cfg.workers = min(8, os.cpu_count() or 1) if cfg.device != "cpu" else 0
    if cfg.precision is None:
        cfg.precision = "bf16" if cfg.device == "cuda" else "fp32"
    if not cfg.batch_size >= 2:     # `not >=` also catches NaN
        raise UsageError(f"--batch-size must be at least 2 (SIGReg and the feature statistics compare images), "
                         f"got {cfg.batch_size}")
    for name in ("img_size", "patch_size", "batch_size", "epochs", "num_slices", "ckpt_every", "log_every", "clip_grad",
                 "max_bad_steps", "embed_dim", "depth", "num_heads", "pred_dim", "pred_depth", "pred_heads", "steps"):
        value = getattr(cfg, name)
        if value is not None and not value > 0:                      # `not > 0` also catches NaN
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    checks = [
        (cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}"),
        (0 < cfg.lr < math.inf and 0 <= cfg.min_lr < math.inf,
         f"--lr must be positive and --min-lr >= 0, both finite, got {cfg.lr}, {cfg.min_lr}"),
        (0 <= cfg.lam <= 1, f"--lam must lie in [0, 1], got {cfg.lam}"),
        (0 <= cfg.warmup < 1, f"--warmup is a fraction of the steps in [0, 1), got {cfg.warmup}"),
        (0 <= cfg.ema <= cfg.ema_end <= 1, f"need 0 <= --ema <= --ema-end <= 1, got {cfg.ema}, {cfg.ema_end}"),
        (0 <= cfg.weight_decay < math.inf and 0 <= cfg.weight_decay_end < math.inf,
         "--weight-decay and --weight-decay-end must be finite and >= 0"),
        (cfg.data_dir is None or cfg.data != "synthetic", "--data-dir is not used with --data synthetic: drop it"),
        (cfg.precision in ("bf16", "fp32"), f"--precision must be bf16 or fp32, got '{cfg.precision}'"),
        (cfg.sigreg_on in ("tokens", "pooled"), f"--sigreg-on must be tokens or pooled, got '{cfg.sigreg_on}'"),
        (cfg.device in ("cpu", "cuda", "mps"), f"--device must be auto, cpu, cuda or mps, got '{cfg.device}'"),
        (cfg.device != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device here; use --device cpu"),
        (cfg.device != "mps" or torch.backends.mps.is_available(), "--device mps: no MPS device here"),
        (cfg.model in model.PRESETS, f"unknown --model '{cfg.model}': choose one of {', '.join(model.PRESETS)}"),
        (cfg.img_size % cfg.patch_size == 0,
         f"--img-size {cfg.img_size} is not divisible by --patch-size {cfg.patch_size}: change one of them"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    sizes = model.preset(cfg.model, **{k: getattr(cfg, k) for k in SIZES})
    for width, heads in (("embed_dim", "num_heads"), ("pred_dim", "pred_heads")):
        if sizes[width] % sizes[heads] or sizes[width] % 4:
            raise UsageError(f"--{width.replace('_', '-')} {sizes[width]} must be divisible by 4 and by "
                             f"--{heads.replace('_', '-')} {sizes[heads]}")
    try:
        masks.check_config((cfg.img_size // cfg.patch_size,) * 2, masks.MaskConfig())
    except ValueError as error:
        raise UsageError(f"--img-size {cfg.img_size} / --patch-size {cfg.patch_size}: {error}") from None
    return cfg


# ----------------------------------------------------------------------------- schedules

def cosine(step, total, start, end):
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


def schedules(cfg, step, total):
    """Learning rate (linear warmup, then cosine to min_lr), weight decay (cosine up, I-JEPA) and
    EMA momentum (linear from ema to ema_end, I-JEPA) at optimizer step `step` of `total`."""
    warmup = int(cfg.warmup * total)
    if step < warmup:
        lr = cfg.lr * (step + 1) / warmup
    else:
        lr = cosine(step - warmup, total - warmup, cfg.lr, cfg.min_lr)
    weight_decay = cosine(step, total, cfg.weight_decay, cfg.weight_decay_end)
    momentum = cfg.ema + (cfg.ema_end - cfg.ema) * step / max(total, 1)
    return lr, weight_decay, momentum


# ----------------------------------------------------------------------------- model and optimizer

def build_models(cfg):
    """Context encoder, predictor and the target encoder (a frozen copy, updated only by EMA)."""
    torch.manual_seed(cfg.seed)
    context_encoder = model.build_encoder(cfg.model, cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth,
                                          cfg.num_heads)
    predictor = model.build_predictor(cfg.model, context_encoder.embed_dim, cfg.pred_dim, cfg.pred_depth,
                                      cfg.pred_heads)
    target_encoder = copy.deepcopy(context_encoder).requires_grad_(False)
    return context_encoder, predictor, target_encoder


def build_optimizer(cfg, context_encoder, predictor):
    """AdamW over every trainable parameter; no weight decay on biases, norms and the mask token
    (all the 1-d parameters), as in I-JEPA. The wd of group 0 follows the schedule."""
    params = [p for m in (context_encoder, predictor) for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999),
                             fused=True)


@torch.no_grad()
def ema_update(target_encoder, context_encoder, momentum):
    """target <- m * target + (1 - m) * context. Called AFTER optimizer.step(), so the target
    follows the weights the step just produced."""
    target = list(target_encoder.parameters())
    source = [p.detach() for p in context_encoder.parameters()]
    torch._foreach_lerp_(target, source, 1.0 - momentum)


# ----------------------------------------------------------------------------- data

class SeededItems(torch.utils.data.Dataset):
    """Wraps a dataset so that each item's augmentation is seeded by (run seed, epoch, index):
    a resumed run, or N processes, see exactly the crops of one uninterrupted process. (With
    --cache, crops are drawn on the device per batch and process instead: a resume with the same
    number of processes repeats them, one with another number does not.)"""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue seeds for CUDA, XPU and MTIA,
            # recording a stack trace each time, which took 60% of CIFAR-10's loading time.
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class GlobalBatches(torch.utils.data.Sampler):
    """Yields this process's share of each global batch: epoch e shuffles all indices with seed
    (seed, e), global batch i is the i-th slice of B_global, process r takes rows [r B, (r+1) B).
    Starting at `start` batches into the first epoch is what makes resume exact."""

    def __init__(self, size, global_batch, rank, world, seed, epoch, start):
        self.size, self.global_batch, self.rank, self.world = size, global_batch, rank, world
        self.seed, self.epoch, self.start = seed, epoch, start

    def __len__(self):
        return self.size // self.global_batch - self.start

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        local = self.global_batch // self.world
        for i in range(self.start, self.size // self.global_batch):
            rows = order[i * self.global_batch + self.rank * local: i * self.global_batch + (self.rank + 1) * local]
            yield [(int(index), (self.seed * 100_003 + self.epoch) * 10_000_019 + int(index)) for index in rows]


def training_set(cfg, rank, world):
    """The augmented training images; with --cache, decoded squares of side img_size / 0.875 read
    from a memmap in OUT/../cache (built once, by rank 0), to be cropped and flipped on the device."""
    if not cfg.cache:
        return data.build_dataset(cfg.data, cfg.data_dir, "train", cfg.img_size, augment=True, seed=cfg.seed)
    source = data.build_dataset(cfg.data, cfg.data_dir, "train", cfg.img_size, augment=False, seed=cfg.seed)
    size = round(cfg.img_size / 0.875)
    name = os.path.basename(os.path.normpath(cfg.data))
    # The source in the name: two folders called "images", another seed's synthetic set, or a folder
    # that gained, lost or relabelled files since (data.fingerprint), never share a cache.
    identity = (os.path.abspath(cfg.data), cfg.data_dir, cfg.seed, data.fingerprint(source))
    source_id = hashlib.sha1(repr(identity).encode()).hexdigest()[:8]
    path = os.path.join(os.path.dirname(os.path.abspath(cfg.out)), "cache", f"{name}_train_{size}_{source_id}.npy")
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data.build_cache(source, path, size)
    if world > 1:
        dist.barrier()
    return data.CachedDataset(path, source.classes)


def epoch_loader(cfg, dataset, rank, world, epoch, start):
    sampler = GlobalBatches(len(dataset), cfg.batch_size, rank, world, cfg.seed, epoch, start)
    return torch.utils.data.DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=cfg.workers,
                                       pin_memory=cfg.device == "cuda", persistent_workers=False)


# ----------------------------------------------------------------------------- one training step

def step_generator(cfg, step, salt):
    """A CPU generator seeded by (seed, step): masks and SIGReg slices are the same on every rank
    and after a resume."""
    return torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 4 + salt)


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


# Under --compile the loss is compiled too, so that SIGReg's S x M x J cosines and sines, their sums
# and the L2 error run in inductor's fused kernels rather than one eager op each: the compiled bf16
# step of the tiny preset ran 1.11x faster for it (README, Performance). Wrapped on first use, as
# creating the wrapper imports inductor (about 1.6 s): an eager run or `--help` does not pay it.
@functools.cache
def compiled_jepa_loss():
    return torch.compile(losses.jepa_loss)


def forward_loss(cfg, nets, images, step_masks, step, grid):
    """Steps 2-4 of the module docstring. Returns (loss, l2, sigreg, pooled target features)."""
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
        embeddings = (context * context_valid[..., None]).sum(1) / context_valid.sum(1, keepdim=True)  # (B, D)
    if not all_ranks_true(torch.isfinite(embeddings).all()):
        return None
    # The slices are drawn here, outside any compiled graph (a seeded CPU generator breaks a graph).
    directions = losses.slice_directions(embeddings.shape[1], cfg.num_slices, step_generator(cfg, step, 1),
                                         embeddings.device)                                   # (D, M)
    jepa_loss = compiled_jepa_loss() if cfg.compile else losses.jepa_loss
    loss, l2, regularizer = jepa_loss(predictions, targets, target_valid, embeddings, cfg.lam,
                                      directions=directions)
    return loss, l2, regularizer, target_features.float().mean(1)


def all_ranks_true(flag):
    """One host sync: True only if `flag` holds on every process."""
    flag = flag.to(torch.int32)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def sum_over_ranks(count, device):
    """An int summed over processes (the same total on every one)."""
    if not dist.is_initialized():
        return count
    total = torch.tensor(count, device=device)
    dist.all_reduce(total)
    return int(total)


def mean_over_ranks(values):
    if dist.is_initialized():
        dist.all_reduce(values)
        values = values / dist.get_world_size()
    return values


def feature_health(pooled):
    """Std over the batch (mean over dims) and effective rank, exp(entropy of normalised singular
    values) (Roy & Vetterli 2007), of pooled target features: both fall towards 0 and 1 on collapse.

    Shape: pooled (B, D) -> two floats.
    """
    centered = pooled - pooled.mean(0)
    singular = torch.linalg.svdvals(centered)
    p = singular / singular.sum().clamp(min=1e-12)
    return float(centered.std(0).mean()), float(torch.exp(-(p * (p + 1e-12).log()).sum()))


# ----------------------------------------------------------------------------- checkpoints and logs

def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


CHECKPOINT_KEYS = ("config", "step", "batches", "counters", "context_encoder", "predictor", "target_encoder",
                   "optimizer", "rng")


def previous_path(path):
    return os.path.splitext(path)[0] + "_prev.pt"


def damaged_path(path):
    return os.path.splitext(path)[0] + "_damaged.pt"


def save_checkpoint(path, state):
    """Atomic: write a temporary file, fsync, keep the previous checkpoint as *_prev.pt, rename.
    A kill at any moment leaves at least one complete checkpoint on disk."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if os.path.exists(path):
        os.replace(path, previous_path(path))
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)  # the renames reach the disk too
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_checkpoint(path):
    """Load `path`, or `*_prev.pt` beside it when `path` is missing or damaged (every zip entry of a
    torch checkpoint carries a CRC-32, which torch.load itself does not verify)."""
    damaged = []
    for candidate in (path, previous_path(path)):
        if not os.path.isfile(candidate):
            continue
        try:
            with zipfile.ZipFile(candidate) as archive:
                if archive.testzip() is None:
                    return torch.load(candidate, map_location="cpu", weights_only=True), candidate
        except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            pass
        damaged.append(candidate)
        fallback = "; trying the previous one" if candidate == path and os.path.isfile(previous_path(path)) else ""
        print(f"warning: checkpoint {candidate} is damaged or not a checkpoint{fallback}", file=sys.stderr)
    if damaged:
        raise UsageError(f"no usable checkpoint at {path}: move {' and '.join(damaged)} away to start afresh, "
                         f"or point --resume at another checkpoint")
    raise UsageError(f"no checkpoint at {path}: start without --resume or point --resume at a checkpoint")


def complete_rows(lines):
    """The rows of a metrics file that were written whole (a kill can leave half a line)."""
    for line in lines:
        try:
            yield line, json.loads(line)
        except json.JSONDecodeError:
            continue


def trim_metrics(path, step):
    """Drop log lines after `step`: a resumed run rewrites them, so the file equals an uninterrupted run's."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line, row in complete_rows(f) if row["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def plot_curves(metrics_path, png_path, keys=("loss", "l2", "sigreg", "effective_rank")):
    """A PNG with one panel per metric against the step, drawn with Pillow (no matplotlib)."""
    from PIL import Image, ImageDraw
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    width, height, margin = 360, 220, 40
    image = Image.new("RGB", (width * len(keys), height), "white")
    draw = ImageDraw.Draw(image)
    steps = [r["step"] for r in rows]
    for panel, key in enumerate(keys):
        values = [r[key] for r in rows]
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        x0 = panel * width + margin
        points = [(x0 + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (width - 1.5 * margin),
                   height - margin - (v - low) / span * (height - 2 * margin)) for s, v in zip(steps, values)]
        draw.rectangle([x0, margin, x0 + width - 1.5 * margin, height - margin], outline=(180, 180, 180))
        if len(points) > 1:
            draw.line(points, fill=(40, 90, 200), width=2)
        else:  # a run with one logged step: a dot
            x, y = points[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(40, 90, 200))
        draw.text((x0, 10), f"{key}  ({values[-1]:.4g} at step {steps[-1]})", fill="black")
        draw.text((x0 - 35, margin - 6), f"{high:.3g}", fill="black")
        draw.text((x0 - 35, height - margin - 6), f"{low:.3g}", fill="black")
        draw.text((x0, height - margin + 8), str(steps[0]), fill="black")
        draw.text((x0 + width / 2 - 40, height - margin + 8), "step", fill="black")
        draw.text((x0 + width - 1.5 * margin - 20, height - margin + 8), str(steps[-1]), fill="black")
    image.save(png_path)


# ----------------------------------------------------------------------------- the run

class Stop:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint at the end of the current step."""
    signal_number = None

    @classmethod
    def requested(cls, device):
        """Agreed by all processes (torchrun forwards the signal, but not at the same instant)."""
        flag = torch.tensor(int(cls.signal_number is not None), device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    @classmethod
    def install(cls):
        """Returns the previous handlers, to put back when training ends."""
        cls.signal_number = None
        previous = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
        for number in previous:
            signal.signal(number, lambda n, frame: setattr(cls, "signal_number", n))
        return previous


def slow_cpu_bf16():
    """None, or a sentence saying that this CPU runs bf16 matmuls more than 10x slower than fp32. torch's
    fast bf16 matmul (oneDNN) needs AVX-512 (fastest with AVX-512 BF16 or AMX); without it a generic
    kernel runs: a 2048^2 product ran about 400x slower than in fp32 on an AVX2-only EPYC (README,
    Performance). AVX-512 without BF16 emulates bf16 at a few times fp32's cost, which still trains.
    Timed on one thread, best of 3 products of 256 x 256 after a warmup (large enough that call overheads
    do not decide): with every thread, a busy neighbour stalls the short fp32 product more than the long
    bf16 one and hides the gap. About 0.1 s on the AVX2 EPYC."""
    def seconds(dtype):
        a, times = torch.randn(256, 256).to(dtype), []
        for _ in range(4):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return min(times[1:])                                       # the first call was the warmup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        slowdown = seconds(torch.bfloat16) / seconds(torch.float32)
    finally:
        torch.set_num_threads(threads)
    if slowdown <= 10:
        return None
    return f"bf16 matmuls run {slowdown:.0f}x slower than fp32 on this CPU (torch's fast bf16 kernels need AVX-512)"


def setup_distributed(cfg):
    """(rank, world). Under torchrun, one process per device; the global batch is split evenly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    rank = int(os.environ["RANK"])
    # Long timeout: with --cache, the other ranks wait while rank 0 decodes the dataset once.
    dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    if cfg.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.batch_size % world or cfg.batch_size // world < 2:
        raise UsageError(f"--batch-size {cfg.batch_size} must split into at least 2 images for each of the "
                         f"{world} processes")
    return rank, world


def open_run(cfg, rank):
    """The checkpoint to resume from (None for a fresh run). Refuses to overwrite a run's checkpoints
    without --resume, and to resume into a different architecture; warns when the resumed run will
    not follow the stored one exactly."""
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out} is a file, not a folder: pick another --out")
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {cfg.out}: cannot create the folder ({error.strerror}): pick another --out") from None
    holds_a_run = os.path.exists(ckpt_path) or os.path.exists(previous_path(ckpt_path))
    if cfg.resume is None:
        if holds_a_run:
            raise UsageError(f"{cfg.out} already holds a checkpoint: add --resume to continue it, or pick another --out")
        return None
    asked = os.path.join(cfg.resume, "ckpt.pt") if os.path.isdir(cfg.resume) else cfg.resume or ckpt_path
    if holds_a_run and os.path.dirname(os.path.abspath(asked)) != os.path.abspath(cfg.out):
        raise UsageError(f"{cfg.out} already holds a checkpoint of its own: pick another --out to continue {asked}")
    checkpoint, used = load_checkpoint(asked)
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UsageError(f"--resume {used} is not a train.py checkpoint: it lacks {', '.join(missing)}")
    stored = checkpoint["config"]
    changed = [k for k in ARCHITECTURE if stored[k] != getattr(cfg, k)]
    if changed:
        raise UsageError(f"--resume {used}: the checkpoint has another architecture ("
                         + ", ".join(f"{k}={stored[k]} there, {getattr(cfg, k)} here" for k in changed) + ")")
    # .get: a field added after the checkpoint was written (e.g. clip_grad) was None, its default, then
    changed = [f"{k}={stored.get(k)} -> {getattr(cfg, k)}" for k in TRAJECTORY if stored.get(k) != getattr(cfg, k)]
    if changed and rank == 0:
        print(f"warning: resuming with changed settings ({', '.join(changed)}): the run will not continue "
              f"exactly as it started", file=sys.stderr)
    if rank == 0 and used != asked and os.path.abspath(asked) == os.path.abspath(ckpt_path) and os.path.exists(asked):
        # this run's ckpt.pt is damaged: set it aside, or the next save would rotate it over the good *_prev.pt
        os.replace(ckpt_path, damaged_path(ckpt_path))
        print(f"warning: moved the damaged {ckpt_path} to {damaged_path(ckpt_path)}", file=sys.stderr)
    return checkpoint


def without_resume(argv):
    """The command line minus --resume and its optional PATH, to print how to resume."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return kept


def train_step(cfg, nets, optimizer, params, images, step_masks, step, grid, momentum):
    """Steps 2-5 of the module docstring. Returns (loss, l2, sigreg, pooled target features,
    grad norm), or None when a NaN/Inf appeared: then nothing is updated, weights nor EMA."""
    context_encoder, predictor, target_encoder = (unwrap(m) for m in nets)
    out = forward_loss(cfg, nets, images, step_masks, step, grid)
    if out is not None:
        out[0].backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if out is None or not all_ranks_true(torch.isfinite(out[0]) & torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return None
    if cfg.clip_grad is not None:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.clip_grad, grad_norm)    # grad_norm: before clipping
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_update(target_encoder, context_encoder, momentum)
    return (*out, grad_norm)


def unwrap(module):
    """The plain module under torch.compile and DDP wrappers."""
    module = getattr(module, "_orig_mod", module)
    return getattr(module, "module", module)


def train(cfg):
    """Run the training described by `cfg` (already resolved). Returns the output folder."""
    rank, world = setup_distributed(cfg)
    device = torch.device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")) if cfg.device == "cuda" else None)
    if cfg.device == "cuda":
        torch.set_float32_matmul_precision("high")
    if cfg.device == "cpu" and cfg.precision == "bf16" and rank == 0 and (problem := slow_cpu_bf16()):
        print(f"train.py: warning: {problem}: --precision fp32 will train much faster", file=sys.stderr)
    ckpt_path, metrics_path = os.path.join(cfg.out, "ckpt.pt"), os.path.join(cfg.out, "metrics.jsonl")
    checkpoint = open_run(cfg, rank)
    dataset = training_set(cfg, rank, world)
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(dataset)} training images")
    total = cfg.steps or cfg.epochs * steps_per_epoch
    grid = (cfg.img_size // cfg.patch_size,) * 2

    context_encoder, predictor, target_encoder = (m.to(device) for m in build_models(cfg))
    optimizer = build_optimizer(cfg, context_encoder, predictor)
    step, batches, counters = 0, 0, {"skipped_images": 0, "skipped_steps": 0}
    if checkpoint is not None:
        for name, module in [("context_encoder", context_encoder), ("predictor", predictor),
                             ("target_encoder", target_encoder), ("optimizer", optimizer)]:
            module.load_state_dict(checkpoint[name])
        step, batches, counters = checkpoint["step"], checkpoint["batches"], checkpoint["counters"]
        if step > total:
            raise UsageError(f"the checkpoint is at step {step}, but this run has only {total} steps: "
                             f"raise --steps or --epochs")
        torch.set_rng_state(checkpoint["rng"])
    if rank == 0 and checkpoint is not None:
        trim_metrics(metrics_path, step)
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)  # left by a run killed before its first checkpoint
    nets = [DistributedDataParallel(m) if world > 1 else m for m in (context_encoder, predictor)] + [target_encoder]
    nets = [torch.compile(m) for m in nets] if cfg.compile else nets
    params = [p for m in (context_encoder, predictor) for p in m.parameters()]
    if rank == 0:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
        print("config:", json.dumps(asdict(cfg)))
        print(f"{len(dataset)} images, {steps_per_epoch} steps/epoch, {total} steps; encoder "
              f"{model.count_params(context_encoder) / 1e6:.2f}M, predictor {model.count_params(predictor) / 1e6:.2f}M "
              f"params; device {device}, {world} process(es)")
        if cfg.compile and cfg.device == "cpu":  # cold, the tiny preset's first two steps took 190 s and 140 s (README)
            print("--compile: the first steps compile the graphs, minutes on a CPU; inductor's disk cache "
                  "makes later runs start faster")

    def save():
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "config": asdict(cfg), "git_commit": git_commit(), "step": step, "batches": batches,
                "counters": dict(counters),
                "context_encoder": context_encoder.state_dict(), "predictor": predictor.state_dict(),
                "target_encoder": target_encoder.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(), "torch_version": str(torch.__version__)})
        if world > 1:
            dist.barrier()

    previous_handlers = Stop.install()
    bar = tqdm(total=total, initial=step, disable=rank != 0, dynamic_ncols=True)
    bad_in_row, clock, images_seen = 0, time.perf_counter(), 0
    try:
        while step < total and not Stop.requested(device):
            # Batches, not steps, place us in the data: a skipped non-finite step still used one.
            epoch, start = divmod(batches, steps_per_epoch)
            for images, _, skipped in epoch_loader(cfg, dataset, rank, world, epoch, start):
                batches += 1
                counters["skipped_images"] += sum_over_ranks(int(skipped.sum()), device)  # each loads its rows
                lr, weight_decay, momentum = schedules(cfg, step, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.param_groups[0]["weight_decay"] = weight_decay
                images = images.to(device, non_blocking=True)                               # uint8 travels
                if cfg.cache:
                    crops = torch.Generator(device).manual_seed((cfg.seed * 1_000_003 + step) * world + rank)
                    images = data.random_resized_crop_flip(images, cfg.img_size, generator=crops)
                images = data.normalize(images)                                             # (B, 3, H, W)
                step_masks = sample_step_masks(cfg, step, grid, rank, world, device)
                out = train_step(cfg, nets, optimizer, params, images, step_masks, step, grid, momentum)
                if out is None:
                    counters["skipped_steps"] += 1
                    bad_in_row += 1
                    if bad_in_row >= cfg.max_bad_steps:
                        save()
                        raise FloatingPointError(
                            f"{bad_in_row} non-finite steps in a row at step {step}: lower --lr, try --precision "
                            f"fp32, or check the data; the last good state is in {ckpt_path}")
                else:
                    bad_in_row = 0
                    step += 1
                    bar.update(1)
                    images_seen += images.shape[0] * world
                    if step % cfg.log_every == 0 or step == total:
                        img_per_s = images_seen / (time.perf_counter() - clock)
                        log_step(step, epoch, out, (lr, weight_decay, momentum), img_per_s, counters, bar,
                                 metrics_path if rank == 0 else None)
                        clock, images_seen = time.perf_counter(), 0
                stop = Stop.requested(device)  # also during a run of skipped steps
                if stop or (out is not None and (step % cfg.ckpt_every == 0 or step == total)):
                    save()
                if step == total or stop:
                    break
    finally:
        bar.close()
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)
    if Stop.signal_number is not None and step < total:  # a signal during the last step stops nothing
        if rank == 0:
            print(f"stopped by signal {Stop.signal_number} at step {step}; checkpoint saved to {ckpt_path}. "
                  f"Resume with: python train.py {shlex.join(without_resume(sys.argv[1:]))} --resume",
                  file=sys.stderr)
        sys.exit(128 + Stop.signal_number)
    if rank == 0:
        plot_curves(metrics_path, os.path.join(cfg.out, "curves.png"))
        graphs = f"{torch._dynamo.utils.counters['stats']['unique_graphs']} compiled graphs; " if cfg.compile else ""
        print(f"done: {step} steps, {counters['skipped_steps']} skipped steps, {counters['skipped_images']} "
              f"unreadable images skipped; {graphs}checkpoint {ckpt_path}")
    if dist.is_initialized():
        dist.barrier()  # rank 0 was still plotting: tear gloo/NCCL down on all ranks together
        # DDP's reducers must not hold the last reference to the process group: freed from there, gloo's
        # destructor keeps the GIL while it joins gloo's threads, and one of those may need the GIL to
        # free a finished collective's tensors. That deadlock hung a rank once in the test suite (torch
        # 2.13, pytorch#56297). Freed by destroy_process_group, the group releases the GIL first.
        del nets
        dist.destroy_process_group()
    return cfg.out


def log_row(step, epoch, out, schedule, img_per_s, counters):
    """One metrics.jsonl row; loss terms are averaged over processes."""
    loss, l2, regularizer = mean_over_ranks(torch.stack([t.detach().float() for t in out[:3]])).tolist()
    std, effective_rank = feature_health(out[3])
    lr, weight_decay, momentum = schedule
    return {"step": step, "epoch": epoch, "loss": loss, "l2": l2, "sigreg": regularizer, "lr": lr,
            "weight_decay": weight_decay, "momentum": momentum, "grad_norm": out[4].item(), "img_per_s": img_per_s,
            "feature_std": std, "effective_rank": effective_rank, **counters}


def log_step(step, epoch, out, schedule, img_per_s, counters, bar, metrics_path):
    """Show the step's numbers on the progress bar; on rank 0 (metrics_path given) append them to
    metrics.jsonl and warn when the target features look collapsed."""
    row = log_row(step, epoch, out, schedule, img_per_s, counters)
    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_s']:.0f}")
    if metrics_path is None:
        return
    write_row(metrics_path, row)
    # The effective rank of B pooled features is at most B - 1: a rank below 2 says collapse only
    # where the batch allows at least 4.
    batch = out[3].shape[0]
    if row["feature_std"] < 1e-3 or (row["effective_rank"] < 2 and min(batch - 1, out[3].shape[1]) >= 4):
        tqdm.write(f"warning: target features look collapsed at step {step} (std {row['feature_std']:.2e}, "
                   f"effective rank {row['effective_rank']:.2f}); raise --lam")


def write_row(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = None
    try:
        cfg = resolve(Config(**vars(args)))
        train(cfg)
    except torch.OutOfMemoryError:
        # Checkpoints are written atomically (save_checkpoint): the last one on disk stays whole.
        sizes = "" if cfg is None else f" at --batch-size {cfg.batch_size}, --img-size {cfg.img_size}"
        exit_usage(f"out of GPU memory{sizes}: lower --batch-size (or --img-size); checkpoints already "
                   f"written are kept")
    except (UsageError, data.DataError) as error:
        # An error raised in a DataLoader worker arrives wrapped: its own message is the last line.
        exit_usage(str(error).strip().splitlines()[-1].removeprefix("data.DataError: "))
    except FloatingPointError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # before the training loop or after it (inside it, Stop saves a checkpoint)
        print("train.py: interrupted; checkpoints already written are kept", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
