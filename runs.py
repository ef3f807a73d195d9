"""Run plumbing for train.py and eval_probe.py: usage errors, devices, the data order that makes
resume exact, DDP helpers, stop signals, checkpoints (atomic, CRC-checked, with a previous copy),
resume bookkeeping, and the metrics file with its curve plot. None of it is the method."""
import argparse
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import zipfile

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import model

def mixed_seed(seed, *parts):
    """One seed from `seed` and (value, count) parts, value < count: seed * count + value, part after
    part. Distinct parts give distinct seeds, so masks, slices, crops and data order never share one."""
    for value, count in parts:
        seed = seed * count + value
    return seed


ARCHITECTURE = ("model", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "pred_dim", "pred_depth",
                "pred_heads")
TRAJECTORY = ("data", "batch_size", "epochs", "steps", "lr", "lam", "seed", "ema", "sigreg_on", "clip_grad")


class UsageError(ValueError):
    """A problem with the command line or its inputs: reported in one line, exit code 2."""


class NotACheckpoint(UsageError):
    """A file that torch.save did not write: no *_prev.pt beside it stands in for it."""


def exit_usage(message, program="train.py"):
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)




def pick_device(name):
    """The named device, or for "auto" the first of cuda, mps, cpu that this machine has."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(device for device, present in available.items() if present)
    if name not in available:
        raise UsageError(f"--device must be auto, cpu, cuda or mps, got '{name}'")
    if not available[name]:
        raise UsageError(f"--device {name}: no such device on this machine; use --device cpu")
    return name


def default_workers(device):
    """DataLoader processes: none on a CPU, where they would take the cores the model needs."""
    return 0 if device == "cpu" else min(8, os.cpu_count() or 1)


def config_parser(config, none_means, epilog):
    """A command line with one flag per field of the dataclass `config`; none_means[name] says what a
    None default stands for (else "the dataset's or preset's default")."""
    parser = argparse.ArgumentParser(description="Train an image JEPA; every flag is a field of Config.",
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    for field in dataclasses.fields(config):
        flag = "--" + field.name.replace("_", "-")
        kind = field.type
        meaning = none_means.get(field.name, "the dataset's or preset's default")
        shown = meaning if field.default is None else field.default
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        elif field.name == "resume":
            parser.add_argument(flag, nargs="?", const="", default=None, metavar="PATH",
                                help="continue OUT/ckpt.pt, or the checkpoint PATH (a run folder: its ckpt.pt); "
                                     "a run already at --steps says so, changes nothing and exits 0")
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=f"default: {shown}")
    parser.error = exit_usage
    return parser


POSITIVE = ("img_size", "patch_size", "batch_size", "epochs", "num_slices", "ckpt_every", "log_every", "clip_grad",
            "max_bad_steps", "embed_dim", "depth", "num_heads", "pred_dim", "pred_depth", "pred_heads", "steps")


def check_values(cfg):
    """The ranges of train.py's flags; the sizes of model and masks are checked by model.py and masks.py."""
    if not cfg.batch_size >= 2:     # `not >=` also catches NaN
        raise UsageError(f"--batch-size must be at least 2 (SIGReg and the feature statistics compare images), "
                         f"got {cfg.batch_size}")
    for name in POSITIVE:
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
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)

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
            # recording a stack trace each time, which costs more than loading a small image.
            torch.default_generator.manual_seed(seed)
            image, label, skipped = self.dataset[index]
        return image, label, index if skipped else -1    # the index names the unreadable file (batches)


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
        epoch_seed = mixed_seed(self.seed, (self.epoch, 100_003))
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(epoch_seed))
        local = self.global_batch // self.world
        for i in range(self.start, self.size // self.global_batch):
            rows = order[i * self.global_batch + self.rank * local: i * self.global_batch + (self.rank + 1) * local]
            yield [(int(index), mixed_seed(epoch_seed, (int(index), 10_000_019))) for index in rows]


def device_batch(cfg, images, step, rank, world, device):
    """The loader's batch on the device, normalised; with --cache, cropped and flipped there first."""
    images = images.to(device, non_blocking=True)                                       # uint8 travels
    if cfg.cache:
        crops = torch.Generator(device).manual_seed(mixed_seed(cfg.seed, (step, 1_000_003), (rank, world)))
        images = data.random_resized_crop_flip(images, cfg.img_size, generator=crops)
    return data.normalize(images)                                                       # (B, 3, H, W)


def training_set(cfg):
    """The training images, at least one global batch of them: augmented, or with --cache the source
    that cached_training_set decodes once."""
    dataset = data.build_dataset(cfg.data, cfg.data_dir, "train", cfg.img_size, augment=not cfg.cache,
                                 seed=cfg.seed)
    if len(dataset) < cfg.batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(dataset)} training images")
    return dataset


def cached_training_set(cfg, source, rank, world):
    """Decoded squares of side img_size / 0.875 of the `source` images, read from a memmap in
    OUT/../cache (built once, by rank 0), to be cropped and flipped on the device."""
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


def batches(cfg, dataset, progress, total, rank, world, device):
    """(epoch, uint8 images) of this process, from where `progress` stands in the data, until the
    last step or a stop signal. Counts the batches and the unreadable images skipped in them."""
    steps_per_epoch = len(dataset) // cfg.batch_size
    progress.clock = progress.started = time.perf_counter()
    progress.start_step = progress.step
    while progress.step < total and not Stop.requested(device):
        epoch, start = divmod(progress.batches, steps_per_epoch)
        for images, _, unreadable in epoch_loader(cfg, dataset, rank, world, epoch, start):
            progress.batches += 1
            note_unreadable(progress, unreadable, device)
            yield epoch, images


def note_unreadable(progress, indices, device):
    """Adds the batch's unreadable files (dataset indices, -1 for a readable one), of every process (each
    loads its own rows), to progress.unreadable: a file met again in a later epoch counts once."""
    found = [int(index) for index in indices if index >= 0]
    if not sum_over_ranks(len(found), device):
        return
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, found)
        found = [index for part in gathered for index in part]
    progress.unreadable.update(found)
    progress.counters["skipped_images"] = len(progress.unreadable)


def epoch_loader(cfg, dataset, rank, world, epoch, start):
    sampler = GlobalBatches(len(dataset), cfg.batch_size, rank, world, cfg.seed, epoch, start)
    return torch.utils.data.DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=cfg.workers,
                                       pin_memory=cfg.device == "cuda", persistent_workers=False)


# ----------------------------------------------------------------------------- processes

def unwrap(module):
    """The plain module under torch.compile and DDP wrappers."""
    module = getattr(module, "_orig_mod", module)
    return getattr(module, "module", module)


@functools.cache
def compiled(function):
    """torch.compile(function), made on first use: creating it imports inductor, which an eager run
    or `--help` then does not pay for."""
    return torch.compile(function)


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


def brief(message, limit=200):
    """The first sentence of a long, multi-line torch error message."""
    sentence = message.strip().split("\n")[0].split(". ")[0].strip()
    return sentence if len(sentence) <= limit else sentence[:limit] + "..."


def read_checkpoint(path, mmap=False):
    """The checkpoint at `path`, verified first: every zip entry of a torch checkpoint carries a
    CRC-32, which torch.load itself does not check. weights_only: a checkpoint is data, and
    unpickling arbitrary objects runs code. mmap: tensors are paged in only when used."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip() is not None
    except (zipfile.BadZipFile, OSError):
        with open(path, "rb") as f:
            start = f.read(4)
        # torch.save writes a zip, which starts with PK\3\4: such a start without the zip's end is a cut write
        if start and start != b"PK\x03\x04":
            raise NotACheckpoint(f"{path} is not a checkpoint (torch.save did not write it)") from None
        raise UsageError(f"{path} is truncated (its writing was cut short): train.py keeps the one before as "
                         f"*_prev.pt") from None
    if damaged:
        raise UsageError(f"{path} is damaged (a CRC check failed): train.py keeps the one before as *_prev.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        reason = brief(str(error).split("WeightsUnpickler error:")[-1])
        raise UsageError(f"cannot load {path} with weights_only=True: {reason}") from None


def load_checkpoint(path):
    """(checkpoint, the path it came from, warnings to print once the run is accepted): `path`, or
    `*_prev.pt` beside it when `path` is missing, damaged or truncated."""
    damaged, notes = [], []
    for candidate in (path, previous_path(path)):
        if not os.path.isfile(candidate):
            continue
        try:
            return read_checkpoint(candidate), candidate, notes
        except NotACheckpoint:
            raise
        except UsageError as error:
            damaged.append(candidate)
            notes.append(f"warning: {error}")
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


def trim_metrics(source, path, step):
    """OUT/metrics.jsonl as the rows of `source` up to `step`: a resumed run rewrites the later ones, so
    the file equals an uninterrupted run's; a fork starts from the rows of the run it continues."""
    kept = []
    if os.path.exists(source):
        with open(source) as f:
            kept = [line for line, row in complete_rows(f) if row["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


TITLES = {"loss": "loss", "l2": "L2 prediction error", "sigreg": "SIGReg", "effective_rank": "effective rank"}


def plot_curves(metrics_path, png_path, keys=tuple(TITLES)):
    """A PNG with one panel per metric against the step, drawn with Pillow (no matplotlib)."""
    from PIL import Image, ImageDraw, ImageFont
    with open(metrics_path) as f:
        rows = [row for _, row in complete_rows(f)]
    if not rows:
        return
    width, height = 420, 280
    image = Image.new("RGB", (width * len(keys), height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    for panel, key in enumerate(keys):
        draw_panel(draw, font, (panel * width, 0, width, height), key, [(r["step"], r[key]) for r in rows])
    image.save(png_path)


def axis(values):
    """(to_unit, ticks, log) for a panel's y axis: a log scale where the values are positive and span
    two decades or more, else a linear one. to_unit maps a value to [0, 1]; ticks are (value, label)."""
    low, high = min(values), max(values)
    if low > 0 and high / low >= 100:
        low_log, high_log = math.log10(low), math.log10(high)
        ticks = [(10.0 ** e, f"1e{e}") for e in range(math.ceil(low_log), math.floor(high_log) + 1)]
        return lambda v: (math.log10(v) - low_log) / (high_log - low_log), ticks, True
    if high == low:
        return lambda v: 0.5, [(low, f"{low:.3g}")], False
    step = 10.0 ** math.floor(math.log10((high - low) / 4))
    step *= next(m for m in (1, 2, 5, 10) if (high - low) / (step * m) <= 5)      # 2 to 5 round ticks
    decimals = max(0, -math.floor(math.log10(step)))
    ticks = [(i * step, f"{i * step:.{decimals}f}") for i in range(math.ceil(low / step), math.floor(high / step) + 1)]
    return lambda v: (v - low) / (high - low), ticks, False


def draw_panel(draw, font, box, key, points):
    """One metric's panel: title with the last value, y ticks (log where axis says), the step axis."""
    left, top, width, height = box
    x0, x1, y0, y1 = left + 70, left + width - 20, top + 40, top + height - 45
    first, last = points[0][0], points[-1][0]
    to_unit, ticks, log = axis([v for _, v in points])
    to_x = (lambda s: x0 + (s - first) / (last - first) * (x1 - x0)) if last > first else (lambda s: (x0 + x1) / 2)
    to_y = lambda v: y1 - to_unit(v) * (y1 - y0)
    draw.rectangle([x0, y0, x1, y1], outline=(180, 180, 180))
    for value, label in ticks:
        draw.line([x0 - 4, to_y(value), x0, to_y(value)], fill="black")
        draw.text((x0 - 8, to_y(value)), label, fill="black", font=font, anchor="rm")
    xy = [(to_x(s), to_y(v)) for s, v in points]
    if len(xy) > 1:
        draw.line(xy, fill=(40, 90, 200), width=2)
    else:  # a run with one logged step: a dot
        draw.ellipse([xy[0][0] - 4, xy[0][1] - 4, xy[0][0] + 4, xy[0][1] + 4], fill=(40, 90, 200))
    scale = " (log scale)" if log else ""
    draw.text((x0, top + 12), f"{TITLES.get(key, key)}{scale}: {points[-1][1]:.4g} at step {last}", fill="black",
              font=font)
    for step, anchor in ((first, "la"), (last, "ra")):
        draw.text((to_x(step), y1 + 6), str(step), fill="black", font=font, anchor=anchor)
    draw.text(((x0 + x1) / 2, y1 + 24), "step", fill="black", font=font, anchor="ma")


# ----------------------------------------------------------------------------- the run

class Stop:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint at the end of the current step. A second
    Ctrl-C stops at once (KeyboardInterrupt): checkpoints are written atomically, the last one stays whole."""
    signal_number = None

    @classmethod
    def requested(cls, device):
        """Agreed by all processes (torchrun forwards the signal, but not at the same instant)."""
        flag = torch.tensor(int(cls.signal_number is not None), device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    @classmethod
    def handle(cls, number, frame):
        if number == signal.SIGINT and cls.signal_number is not None:
            raise KeyboardInterrupt
        cls.signal_number = number
        if number == signal.SIGINT and os.environ.get("RANK", "0") == "0":
            # os.write, not print: a handler can run in the middle of a print to the same stream
            os.write(2, b"\ntrain.py: stopping after this step; Ctrl-C again to stop now\n")

    @classmethod
    @contextlib.contextmanager
    def handling(cls):
        """Within the block, SIGINT and SIGTERM go to Stop.handle; the previous handlers come back after it."""
        cls.signal_number = None
        previous = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
        for number in previous:
            signal.signal(number, cls.handle)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def slow_cpu_bf16():
    """None, or a sentence saying that this CPU runs bf16 matmuls more than 10x slower than fp32. torch's
    fast bf16 matmul (oneDNN) needs AVX-512 (fastest with AVX-512 BF16 or AMX); without it a generic
    kernel runs, orders of magnitude slower than fp32. AVX-512 without BF16 emulates bf16 at a few
    times fp32's cost, which still trains. Timed on one thread, best of 3 products of 256 x 256 after a
    warmup (large enough that call overheads do not decide): with every thread, a busy neighbour stalls
    the short fp32 product more than the long bf16 one and hides the gap."""
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


def default_out(resume):
    """--out when it is not given: the folder of the run that --resume PATH continues, else runs/default."""
    if not resume:
        return "runs/default"
    return resume if os.path.isdir(resume) else os.path.dirname(resume) or "."


def open_run(cfg, total, rank):
    """(checkpoint or None for a fresh run, the run folder it came from). Refuses to overwrite a run's
    checkpoints without --resume, and to resume into a different architecture or past --steps; exits
    at once when the run is already finished. Only then creates OUT and prints the warnings."""
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out} is a file, not a folder: pick another --out")
    holds_a_run = os.path.exists(ckpt_path) or os.path.exists(previous_path(ckpt_path))
    if cfg.resume is None and holds_a_run:
        raise UsageError(f"{cfg.out} already holds a checkpoint: {advice_for_a_taken_folder(cfg, ckpt_path)}")
    checkpoint, source, notes, damaged = None, cfg.out, [], False
    if cfg.resume is not None:
        checkpoint, source, notes, damaged = resumed_checkpoint(cfg, total, ckpt_path, holds_a_run, rank)
    prepare_folder(cfg.out)
    if rank == 0:
        for note in notes:
            print(note, file=sys.stderr)
        if damaged:  # set aside, or the next save would rotate the damaged ckpt.pt over the good *_prev.pt
            os.replace(ckpt_path, damaged_path(ckpt_path))
    return checkpoint, source


def advice_for_a_taken_folder(cfg, ckpt_path):
    """What to do when OUT holds a run and --resume is absent: --resume only where it would be accepted."""
    try:
        changed = architecture_changes(read_checkpoint(ckpt_path, mmap=True)["config"], cfg)
    except (UsageError, KeyError, TypeError):  # damaged or foreign: --resume says more
        changed = ""
    if changed:
        return f"a run of another architecture ({changed}): pick another --out"
    return "add --resume to continue it, or pick another --out"


def architecture_changes(stored, cfg):
    """The ARCHITECTURE fields where the stored config and cfg differ, as text ("" where none do)."""
    return ", ".join(f"{k}={stored[k]} there, {getattr(cfg, k)} here" for k in ARCHITECTURE
                     if stored[k] != getattr(cfg, k))


def resumed_checkpoint(cfg, total, ckpt_path, holds_a_run, rank):
    """open_run's checks of --resume: (checkpoint, its run folder, warnings to print, whether OUT/ckpt.pt
    is damaged and the run goes on from the *_prev.pt beside it)."""
    asked = os.path.join(cfg.resume, "ckpt.pt") if os.path.isdir(cfg.resume) else cfg.resume or ckpt_path
    if holds_a_run and os.path.dirname(os.path.abspath(asked)) != os.path.abspath(cfg.out):
        raise UsageError(f"{cfg.out} already holds a checkpoint of its own: pick another --out to continue {asked}")
    checkpoint, used, notes = load_checkpoint(asked)
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UsageError(f"--resume {used} is not a train.py checkpoint: it lacks {', '.join(missing)}")
    stored = checkpoint["config"]
    if changed := architecture_changes(stored, cfg):
        raise UsageError(f"--resume {used}: the checkpoint has another architecture ({changed})")
    if checkpoint["step"] > total:
        raise UsageError(f"the checkpoint is at step {checkpoint['step']}, but this run has only {total} steps: "
                         f"raise --steps or --epochs")
    if checkpoint["step"] == total:
        if rank == 0:
            print(f"train.py: {used} is already finished at step {total}: nothing to do (raise --steps or "
                  f"--epochs to train it further)")
        teardown()
        sys.exit(0)
    # .get: a field added after the checkpoint was written (e.g. clip_grad) was None, its default, then
    changed = [f"{k}={stored.get(k)} -> {getattr(cfg, k)}" for k in TRAJECTORY if stored.get(k) != getattr(cfg, k)]
    if changed:
        notes.append(f"warning: resuming with changed settings ({', '.join(changed)}): the run will not continue "
                     f"exactly as it started")
    damaged = used != asked and os.path.abspath(asked) == os.path.abspath(ckpt_path) and os.path.exists(asked)
    if damaged:
        notes.append(f"warning: moved the damaged {ckpt_path} to {damaged_path(ckpt_path)}")
    return checkpoint, os.path.dirname(used) or ".", notes, damaged


CREATED_FOLDERS = []  # made by prepare_folder in this process, deepest first


def prepare_folder(out):
    """Creates OUT and any missing folder above it (remembered, to be removed again if the run fails
    while they are empty), and checks that files can be written in it."""
    missing, folder = [], os.path.abspath(out)
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    probe = os.path.join(out, f".write_check_{os.getpid()}")
    try:
        os.makedirs(out, exist_ok=True)
        CREATED_FOLDERS.extend(missing)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"--out {out}: cannot write there ({error.strerror}): pick another --out") from None


@contextlib.contextmanager
def removing_new_empty_folders():
    """A run that fails leaves no empty folder behind: of those prepare_folder made, the empty ones go."""
    CREATED_FOLDERS.clear()
    try:
        yield
    except BaseException:
        for folder in CREATED_FOLDERS:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only an empty folder goes
        raise


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



@dataclasses.dataclass
class Progress:
    """Where a run stands. Batches, not steps, place it in the data: a skipped non-finite step used one."""
    step: int = 0
    batches: int = 0
    counters: dict = dataclasses.field(default_factory=lambda: {"skipped_images": 0, "skipped_steps": 0})
    unreadable: set = dataclasses.field(default_factory=set)    # dataset indices of the unreadable files met
    seconds: float = 0.0            # training time of the earlier processes of this run
    # not saved: a resumed run starts a new row of non-finite steps and a new img/s measurement
    bad_in_row: int = 0
    clock: float = 0.0
    images_seen: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    start_step: int = 0

    def elapsed(self):
        """Seconds this run has trained, over all its processes."""
        return self.seconds + time.perf_counter() - self.started


def process_device(cfg, rank):
    """This process's device (cuda:LOCAL_RANK under torchrun); warns when this CPU's bf16 is slow."""
    device = torch.device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")) if cfg.device == "cuda" else None)
    if cfg.device == "cuda":
        torch.set_float32_matmul_precision("high")
    if cfg.device == "cpu" and cfg.precision == "bf16" and rank == 0 and (problem := slow_cpu_bf16()):
        print(f"train.py: warning: {problem}: --precision fp32 will train much faster", file=sys.stderr)
    return device


def restore(checkpoint, source, state, out, rank):
    """The Progress of a resumed run, after loading `state` (name -> module or optimizer) and the CPU
    generator from `checkpoint`, which came from the run folder `source`; a fresh run (checkpoint None)
    starts at 0. On rank 0, OUT/metrics.jsonl becomes the source's rows up to the checkpoint's step, so
    the file equals an uninterrupted run's."""
    metrics_path = os.path.join(out, "metrics.jsonl")
    if checkpoint is None:
        if rank == 0 and os.path.exists(metrics_path):
            os.remove(metrics_path)  # left by a run killed before its first checkpoint
        return Progress()
    for name, module in state.items():
        module.load_state_dict(checkpoint[name])
    progress = Progress(checkpoint["step"], checkpoint["batches"], checkpoint["counters"],
                        set(checkpoint.get("unreadable", [])), checkpoint.get("seconds", 0.0))
    torch.set_rng_state(checkpoint["rng"])
    if rank == 0:
        trim_metrics(os.path.join(source, "metrics.jsonl"), metrics_path, progress.step)
    return progress


def save_run(cfg, state, progress, rank, world):
    """Rank 0 writes OUT/ckpt.pt; the others wait for it."""
    if rank == 0:
        save_checkpoint(os.path.join(cfg.out, "ckpt.pt"), {
            "config": dataclasses.asdict(cfg), "git_commit": git_commit(), "step": progress.step,
            "batches": progress.batches, "counters": dict(progress.counters),
            "unreadable": sorted(progress.unreadable), "seconds": progress.elapsed(),
            **{name: module.state_dict() for name, module in state.items()},
            "rng": torch.get_rng_state(), "torch_version": str(torch.__version__)})
    if world > 1:
        dist.barrier()


def announce(cfg, recipe, images, total, networks, device, world):
    """OUT/config.json, and a summary of what is about to run. networks: context encoder and predictor."""
    sizes = [model.count_params(network) / 1e6 for network in networks]
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    where = f"{world} processes on {device.type}" if world > 1 else str(device)
    print(f"train.py: --data {cfg.data}, recipe {recipe} (every setting in {cfg.out}/config.json)\n"
          f"  {cfg.model} ViT, {cfg.img_size} px, patch {cfg.patch_size}: encoder {sizes[0]:.3g}M + predictor "
          f"{sizes[1]:.3g}M params\n"
          f"  {total} steps of {cfg.batch_size} images ({images} images, {images // cfg.batch_size} steps/epoch), "
          f"lr {cfg.lr:g}, lam {cfg.lam:g}; {where}, {cfg.precision}")
    if cfg.compile and cfg.device == "cpu":
        print("--compile: the first steps compile the graphs, minutes on a CPU; inductor's disk cache "
              "makes later runs start faster")


def estimate(progress, total, after=5):
    """One line with the time the rest of the run should take, once `after` steps of this process are
    done; none where the run ends within seconds anyway."""
    done = progress.step - progress.start_step
    if done == after:
        left = (time.perf_counter() - progress.started) / done * (total - progress.step)
        if left >= 10:
            tqdm.write(f"train.py: about {duration(left)} to go for the {total - progress.step} steps left")


def duration(seconds):
    """Seconds as a short reading: 42s, 3m 05s, 2h 07m."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def out_of_memory(args, error):
    """The line for an out-of-memory `error` (else re-raises it), naming the size flags the command line
    set, or both. Checkpoints are written atomically: those already on disk stay whole."""
    on_gpu = isinstance(error, torch.OutOfMemoryError)
    if not (on_gpu or isinstance(error, MemoryError) or "can't allocate memory" in str(error)):
        raise error
    flags = [flag for flag in ("--batch-size", "--img-size") if getattr(args, flag[2:].replace("-", "_")) is not None]
    return (f"out of {'GPU ' if on_gpu else ''}memory: lower {' or '.join(flags or ['--batch-size', '--img-size'])}; "
            f"checkpoints already written are kept")


def skipped_step(cfg, state, progress, rank, world):
    """Counts a non-finite step; the --max-bad-steps-th in a row saves and stops the run."""
    progress.counters["skipped_steps"] += 1
    progress.bad_in_row += 1
    if progress.bad_in_row >= cfg.max_bad_steps:
        save_run(cfg, state, progress, rank, world)
        raise FloatingPointError(
            f"{progress.bad_in_row} non-finite steps in a row at step {progress.step}: lower --lr"
            f"{', try --precision fp32' if cfg.precision == 'bf16' else ''}, or check the data; the last good "
            f"state is in {cfg.out}/ckpt.pt")


def finish(cfg, progress, total, rank):
    """Exit 128 + n after signal n (saying how to resume), else plot the curves and report."""
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if Stop.signal_number is not None and progress.step < total:  # a signal during the last step stops nothing
        if rank == 0:
            print(f"stopped by signal {Stop.signal_number} at step {progress.step}; checkpoint saved to "
                  f"{ckpt_path}. Resume with: python train.py {shlex.join(without_resume(sys.argv[1:]))} --resume",
                  file=sys.stderr)
        sys.exit(128 + Stop.signal_number)
    if rank == 0:
        plot_curves(os.path.join(cfg.out, "metrics.jsonl"), os.path.join(cfg.out, "curves.png"))
        graphs = f"{torch._dynamo.utils.counters['stats']['unique_graphs']} compiled graphs; " if cfg.compile else ""
        print(f"done: {progress.step} steps in {duration(progress.elapsed())}, {progress.counters['skipped_steps']} "
              f"skipped steps, {progress.counters['skipped_images']} unreadable images skipped; {graphs}checkpoint "
              f"{ckpt_path}\nnext: python eval_probe.py --ckpt {shlex.quote(ckpt_path)}")


def teardown():
    """End the process group on all ranks together. The caller first drops its DDP wrappers: DDP's
    reducers must not hold the last reference to the process group, as gloo's destructor keeps the
    GIL while it joins gloo's threads, and one of those may need the GIL to free a finished
    collective's tensors (pytorch#56297). Freed by destroy_process_group, the group releases the GIL first."""
    if dist.is_initialized():
        dist.barrier()  # rank 0 was still plotting
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- metrics

def log_row(step, epoch, out, schedule, img_per_s, counters, seconds):
    """One metrics.jsonl row; loss terms are averaged over processes. time_s: the run's training time."""
    terms = torch.stack([t.detach().float() for t in (out.loss, out.l2, out.sigreg)])
    loss, l2, regularizer = mean_over_ranks(terms).tolist()
    std, effective_rank = feature_health(out.pooled_targets)
    lr, weight_decay, momentum = schedule
    return {"step": step, "epoch": epoch, "loss": loss, "l2": l2, "sigreg": regularizer, "lr": lr,
            "weight_decay": weight_decay, "momentum": momentum, "grad_norm": out.grad_norm.item(),
            "img_per_s": img_per_s, "feature_std": std, "effective_rank": effective_rank, **counters,
            "time_s": round(seconds, 3)}


def log_step(cfg, progress, epoch, out, schedule, rank):
    """On rank 0, append the step's numbers to OUT/metrics.jsonl and warn when the target features
    look collapsed. img/s counts the images since the last log."""
    img_per_s = progress.images_seen / (time.perf_counter() - progress.clock)
    row = log_row(progress.step, epoch, out, schedule, img_per_s, progress.counters, progress.elapsed())
    if rank == 0:
        write_row(os.path.join(cfg.out, "metrics.jsonl"), row)
        # The effective rank of B pooled features is at most B - 1: a rank below 2 says collapse only
        # where the batch allows at least 4.
        batch, width = out.pooled_targets.shape
        if row["feature_std"] < 1e-3 or (row["effective_rank"] < 2 and min(batch - 1, width) >= 4):
            tqdm.write(f"warning: target features look collapsed at step {progress.step} (std "
                       f"{row['feature_std']:.2e}, effective rank {row['effective_rank']:.2f}); raise --lam")
    progress.clock, progress.images_seen = time.perf_counter(), 0


def write_row(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
