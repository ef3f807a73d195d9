"""Frozen-feature evaluation of a trained JEPA encoder: linear probe and weighted k-NN.

The encoder is never trained here. Every image (no augmentation) goes through it once,
its patch features are averaged into one vector per image, and two cheap classifiers
read those vectors:

  linear probe   multinomial logistic regression on standardised features
  weighted k-NN  cosine-similarity vote of the k nearest train features (DINO-style)

Run it with `--random-init` too: an untrained encoder of the same architecture is the
baseline that any number from a trained one must beat. Accuracies are fractions in [0, 1].

It also draws what the encoder learned (as in DINO's feature maps): for a few val images, the
first three principal components of the patch features as RGB, for the trained encoder and for
the random-init one (`features_<encoder>.png` beside the checkpoint; --figure, --no-figure).

Shapes:
  B  images in a batch         N  patches per image         D  feature width
  H,W image height, width      h,w patch grid (H/P, W/P), P the patch size
  G  train features (gallery)  Q  query (val) features      C  classes
  V  neighbours that vote in the k-NN (--k)
"""

import argparse
import glob
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError, build_dataset, fingerprint, normalize
from model import build_encoder
import runs
from runs import UsageError

WEIGHT_DECAYS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)


# ----------------------------------------------------------------------------- metrics

def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose true label is among the k highest scores.

    Shape: scores (Q, C), labels (Q,) -> float
    """
    topk = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (topk == labels[:, None]).any(dim=1).float().mean().item()


# ----------------------------------------------------------------------------- k-NN

@torch.no_grad()
def knn_classify(train_x, train_y, query_x, num_classes, k=20, temperature=0.07, chunk_size=1024):
    """Weighted k-NN vote, as in InstDisc / DINO.

    With unit vectors z = x/|x|, each query q takes its V most similar train features
    (s_j = <z_q, z_j>) and scores class c as  sum_{j in topK, y_j = c} exp(s_j / temperature).
    A small temperature lets the closest neighbours dominate the vote.

    Shape: train_x (G, D), train_y (G,), query_x (Q, D) -> scores (Q, C)
    """
    train_z = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train_z))
    scores = []
    # Chunking keeps the (chunk, G) similarity matrix small whatever Q is.
    for query in query_x.split(chunk_size):
        similarity = F.normalize(query.float(), dim=1) @ train_z.T          # (chunk, G)
        top_sim, top_idx = similarity.topk(k, dim=1)                         # (chunk, V)
        votes = torch.zeros(len(query), num_classes)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


# ----------------------------------------------------------------------------- linear probe

def fit_logistic_regression(x, y, num_classes, weight_decay, epochs, init=None) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS.

    Minimises  mean_i CE(W x_i + b, y_i) + (weight_decay / 2) * |W|^2   (bias not decayed).
    The problem is convex, so at most `epochs` L-BFGS iterations (one pass over the data
    each, plus line-search passes; it stops early once the loss stops changing) land near
    the same optimum every time. `init` warm-starts from another fit, which makes a sweep
    over weight decays cheap.

    Shape: x (G, D), y (G,) -> Linear(D, C)
    """
    linear = nn.Linear(x.shape[1], num_classes)
    if init is not None:
        linear.load_state_dict(init.state_dict())
    else:  # convex: the start only changes the time taken; zeros keep the RNG out of it
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=epochs, history_size=10,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), y) + 0.5 * weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear


def linear_probe(train_x, train_y, val_x, val_y, num_classes, weight_decays=WEIGHT_DECAYS,
                 epochs=100, seed=0) -> dict:
    """Linear probe with the weight decay chosen on held-out TRAIN features, never on val.

    Features are standardised with the train mean/std: x' = (x - mu) / sigma. Each weight
    decay is fit on 90% of train and scored on the other 10%; the best one is refit on
    all of train and evaluated once on val.

    Shape: train_x (G, D), train_y (G,), val_x (Q, D), val_y (Q,)
    Returns: {"top1", "top5" (only if C > 10), "best_weight_decay", "heldout_top1": {wd: acc}}
    """
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std

    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    num_heldout = max(1, len(train_x) // 10)
    heldout, fit = order[:num_heldout], order[num_heldout:]

    heldout_top1, fits = {}, {}
    progress = tqdm(total=len(weight_decays) + 1, desc="linear probe", leave=False)
    previous = None
    # Strongest decay first: each fit warm-starts from the smoother solution before it.
    for weight_decay in sorted(weight_decays, reverse=True):
        previous = fit_logistic_regression(train_x[fit], train_y[fit], num_classes,
                                           weight_decay, epochs, init=previous)
        with torch.no_grad():
            heldout_top1[weight_decay] = topk_accuracy(previous(train_x[heldout]), train_y[heldout])
        fits[weight_decay] = previous
        progress.set_postfix(wd=weight_decay, heldout_top1=f"{heldout_top1[weight_decay]:.3f}")
        progress.update()
    best = max(heldout_top1, key=heldout_top1.get)  # a tie goes to the stronger decay
    final = fit_logistic_regression(train_x, train_y, num_classes, best, epochs, init=fits[best])
    progress.update()
    progress.close()

    with torch.no_grad():
        val_scores = final(val_x)
    result = {"top1": topk_accuracy(val_scores, val_y, 1), "best_weight_decay": best,
              "heldout_top1": heldout_top1}
    if num_classes > 10:
        result["top5"] = topk_accuracy(val_scores, val_y, 5)
    return result


# ----------------------------------------------------------------------------- features

@torch.no_grad()
def extract_features(encoder, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features: the encoder in eval mode, no gradients, patch features mean-pooled.

    feature(image) = (1/N) sum_n encoder(image)[n]

    Shape: loader yields uint8 images (B, 3, H, W) and labels (B,) -> features (G, D) float32
           on the CPU, labels (G,) long
    """
    encoder.eval()  # our ViT has no dropout or batch norm, but a fork's might: features must be deterministic
    features, labels = [], []
    for images, batch_labels, *_ in tqdm(loader, desc="features", leave=False):
        # The uint8 copy is 4x smaller than a float one; normalise once it is on the device.
        images = normalize(images.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            patch_features = encoder(images)                                  # (B, N, D)
        features.append(patch_features.float().mean(dim=1).cpu())
        labels.append(torch.as_tensor(batch_labels).long())
    return torch.cat(features), torch.cat(labels)


# ----------------------------------------------------------------------------- checkpoint

REQUIRED_CONFIG_KEYS = ("data", "model", "img_size", "patch_size")
DEFAULT_CKPT = os.path.join("runs", "default", "ckpt.pt")


def checkpoint_path(ckpt: str | None) -> str:
    """--ckpt as a file: a run folder means its ckpt.pt; none means runs/default/ckpt.pt, after a
    warning when another run under runs/ holds a newer checkpoint."""
    if ckpt is None:
        ckpt = DEFAULT_CKPT
        newer = [path for path in glob.glob(os.path.join(os.path.dirname(os.path.dirname(ckpt)), "*", "ckpt.pt"))
                 if os.path.isfile(ckpt) and os.path.getmtime(path) > os.path.getmtime(ckpt)]
        if newer:
            newest = os.path.dirname(max(newer, key=os.path.getmtime))
            print(f"warning: no --ckpt: evaluating {ckpt}, though {newest} is newer (--ckpt {newest} evaluates that)",
                  file=sys.stderr)
    return os.path.join(ckpt, "ckpt.pt") if os.path.isdir(ckpt) else ckpt


def load_checkpoint(path: str) -> dict:
    """The checkpoint dict written by train.py, checked for the keys this script reads."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path} (train first, or pass --ckpt RUN/ckpt.pt; --random-init "
                         f"reads the architecture from one too)")
    # mmap: the optimizer state and the other networks stay on disk.
    checkpoint = runs.read_checkpoint(path, mmap=True)
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    missing = [key for key in REQUIRED_CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if missing or "step" not in checkpoint:
        raise UsageError(f"{path} is not a train.py checkpoint: it lacks "
                         f"{', '.join(['config.' + key for key in missing] or ['step'])}")
    return checkpoint


def build_frozen_encoder(checkpoint: dict, which: str, random_init: bool) -> nn.Module:
    """The architecture from the checkpoint's config, with its `which` weights or untrained ones."""
    config = checkpoint["config"]
    torch.manual_seed(config.get("seed", 0))  # the same baseline encoder on every run
    try:
        encoder = build_encoder(config["model"], config["img_size"], config["patch_size"],
                                embed_dim=config.get("embed_dim"), depth=config.get("depth"),
                                num_heads=config.get("num_heads"))
    except (ValueError, TypeError) as error:
        raise UsageError(f"cannot build the encoder in the checkpoint's config: {error}") from None
    if not random_init:
        key = f"{which}_encoder"
        if key not in checkpoint:
            raise UsageError(f"the checkpoint has no '{key}' weights")
        try:
            encoder.load_state_dict(checkpoint[key])
        except RuntimeError as error:  # "Error(s) in loading state_dict for Encoder: <details>"
            raise UsageError(f"'{key}' does not match the {config['model']} architecture in the "
                            f"checkpoint's config: {runs.brief(str(error).split(':', 1)[-1])}") from None
        if not all(torch.isfinite(weight).all() for weight in encoder.state_dict().values()):
            raise UsageError(f"the checkpoint's '{key}' weights hold NaN or Inf (the run diverged): "
                            f"evaluate an earlier checkpoint")
    return encoder.requires_grad_(False)


# ----------------------------------------------------------------------------- feature cache

def features_of_split(encoder, dataset, args, device) -> dict:
    """Features of one split (a dataset from build_dataset, unaugmented, at the training resolution)."""
    num_classes = dataset.num_classes
    if args.limit is not None and args.limit < len(dataset):
        # A random subset: the first N items of a class-sorted dataset would be one class.
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        dataset = torch.utils.data.Subset(dataset, chosen[:args.limit].sort().values.tolist())
    workers = args.workers if args.workers is not None else runs.default_workers(device.type)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    features, labels = extract_features(encoder, loader, device)
    return {"features": features, "labels": labels, "num_classes": num_classes}


def cached(path: str | None, key: dict, compute) -> dict:
    """compute(), or the result saved at `path` if it was saved under the same key.

    A different key means stale features: they are recomputed and overwritten. The file is
    written to a temporary name and renamed, so a crash never leaves half of one.
    """
    if path is not None and os.path.exists(path):
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry.get("key") == key:
                return entry
        except Exception:
            pass  # an unreadable cache is only a cache miss
    entry = compute()
    if path is not None:
        temporary = f"{path}.tmp{os.getpid()}"
        torch.save({**entry, "key": key}, temporary)
        os.replace(temporary, path)
    return entry


# ----------------------------------------------------------------------------- feature maps (the figure)

FIGURE_IMAGES = 8              # val images in the figure, the same ones on every run
PANEL, GAP, LABEL_WIDTH = 96, 4, 110   # pixels: smallest panel side, space between panels, label column


def pca_colors(features: torch.Tensor) -> torch.Tensor:
    """The first three principal components of patch features, as RGB in [0, 1].

    One PCA over all the patches given, so one colour means one kind of patch in every image.
    Centring makes the colours depend on how patches differ, not on what they share. SVD may
    return either sign of a component, so each is turned to make its largest projection positive.
    Each channel maps its 1st..99th percentile to 0..1, so a few outlier patches do not grey out
    the rest.

    Shape: features (B, N, D) -> colours (B, N, 3)
    """
    x = features.flatten(0, 1).float()                                          # (B * N, D)
    x = x - x.mean(dim=0)
    _, _, components = torch.linalg.svd(x, full_matrices=False)                 # (min(B * N, D), D)
    projections = x @ components[:3].T                                          # (B * N, <= 3)
    largest = projections.gather(0, projections.abs().argmax(dim=0, keepdim=True))  # (1, <= 3)
    projections = F.pad(projections * largest.sign(), (0, 3 - projections.shape[1]))  # (B * N, 3)
    low, high = torch.quantile(projections, torch.tensor([0.01, 0.99]), dim=0)  # (3,) each
    colors = ((projections - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    return colors.view(*features.shape[:2], 3)                                  # (B, N, 3)


@torch.no_grad()
def feature_maps(encoder, images, patch_size, device) -> torch.Tensor:
    """pca_colors of each patch, spread over the patch's pixels (nearest neighbour).

    Shape: images (B, 3, H, W) uint8 -> colour maps (B, H, W, 3) uint8
    """
    encoder.eval()
    features = encoder(normalize(images.to(device))).float().cpu()             # (B, N, D)
    b, _, height, width = images.shape
    grid = pca_colors(features).view(b, height // patch_size, width // patch_size, 3)   # (B, h, w, 3)
    pixels = grid.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)    # (B, H, W, 3)
    return (pixels * 255).round().to(torch.uint8)


def draw_figure(rows, path: str) -> None:
    """A PNG with one labelled row of panels per (label, images (B, H, W, 3) uint8), written to a
    temporary name and renamed, so `path` never holds half a figure."""
    from PIL import Image, ImageDraw
    count, height, width = rows[0][1].shape[:3]
    scale = -(-PANEL // max(height, width))                    # small images are enlarged, whole pixels
    panel_w, panel_h = width * scale, height * scale
    figure = Image.new("RGB", (LABEL_WIDTH + count * (panel_w + GAP), GAP + len(rows) * (panel_h + GAP)), "white")
    draw = ImageDraw.Draw(figure)
    for row, (label, images) in enumerate(rows):
        top = GAP + row * (panel_h + GAP)
        draw.multiline_text((GAP, top + panel_h // 2 - 12), label, fill="black")
        for column, image in enumerate(images.numpy()):
            panel = Image.fromarray(image).resize((panel_w, panel_h), Image.NEAREST)
            figure.paste(panel, (LABEL_WIDTH + column * (panel_w + GAP), top))
    temporary = f"{path}.tmp{os.getpid()}"
    figure.save(temporary, format="PNG")
    os.replace(temporary, path)


def figure_path(args: argparse.Namespace) -> str | None:
    """Where the figure goes: --figure, else beside the checkpoint; None with --no-figure."""
    if args.no_figure:
        return None
    return args.figure or os.path.join(os.path.dirname(args.ckpt), f"features_{args.encoder}.png")


def write_figure(args: argparse.Namespace, path: str) -> None:
    """Images, then the trained and the random-init encoder's feature maps, for FIGURE_IMAGES val images."""
    checkpoint = load_checkpoint(args.ckpt)
    config = checkpoint["config"]
    device = torch.device(runs.pick_device(args.device))
    dataset = build_dataset(*data_source(args, config), "val", config["img_size"], augment=False,
                            seed=config.get("seed", 0))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:FIGURE_IMAGES]
    images = torch.stack([dataset[index][0] for index in chosen.sort().values.tolist()])   # (B, 3, H, W)
    rows = [("image", images.permute(0, 2, 3, 1))]                                      # (B, H, W, 3)
    for label, random_init in ((f"{args.encoder} encoder\nstep {checkpoint['step']}", False), ("random init", True)):
        encoder = build_frozen_encoder(checkpoint, args.encoder, random_init).to(device)
        rows.append((label, feature_maps(encoder, images, config["patch_size"], device)))
    draw_figure(rows, path)


# ----------------------------------------------------------------------------- command line

def exit_usage(message: str) -> None:
    runs.exit_usage(message, program="eval_probe.py")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Linear probe and k-NN on frozen JEPA features.")
    parser.add_argument("--ckpt", help=f"train.py checkpoint, or a run folder (default: {DEFAULT_CKPT})")
    parser.add_argument("--data", help="dataset (default: the checkpoint's)")
    parser.add_argument("--data-dir", help="where the dataset is (default: the checkpoint's)")
    parser.add_argument("--encoder", choices=("target", "context"), default="target", help="EMA target or context")
    parser.add_argument("--random-init", action="store_true", help="untrained encoder: the baseline to beat")
    parser.add_argument("--k", type=int, default=20, help="neighbours in the k-NN vote")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    parser.add_argument("--workers", type=int, help="loader processes (default: 0 on a CPU, else up to 8)")
    parser.add_argument("--limit", type=int, help="at most this many images per split")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write features")
    parser.add_argument("--figure", metavar="PATH", help="write the PCA feature-map figure (trained vs random-init "
                        "encoder on 8 val images) here (default: features_<encoder>.png beside the checkpoint)")
    parser.add_argument("--no-figure", action="store_true", help="draw no figure")
    parser.error = exit_usage
    args = parser.parse_args(argv)
    for name in ("k", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.limit is not None and args.limit < 2:
        parser.error(f"--limit must be at least 2 (standardising features needs two images), got {args.limit}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.json:
        check_writable(args.json)
    if args.figure and not os.path.isdir(os.path.dirname(os.path.abspath(args.figure))):
        parser.error(f"--figure {args.figure}: its folder does not exist")
    return args


def check_writable(path: str) -> None:
    """Refuses, before any work, a --json file that could not be written at the end."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        exit_usage(f"--json {path}: its folder does not exist (the result is written there at the end)")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        exit_usage(f"--json {path}: cannot write there ({error.strerror}): pick another --json")
    if not existed:
        os.remove(path)


def data_source(args: argparse.Namespace, config: dict) -> tuple[str, str | None]:
    """(data, data_dir): the flags, else the checkpoint's; a different dataset does not live in its data_dir."""
    data_dir = args.data_dir
    if data_dir is None and args.data in (None, config["data"]):
        data_dir = config.get("data_dir")
    return args.data or config["data"], data_dir


def evaluate(args: argparse.Namespace) -> dict:
    """Features of both splits (cached), then both classifiers: the dict that main() reports."""
    args.ckpt = checkpoint_path(args.ckpt)
    checkpoint = load_checkpoint(args.ckpt)
    config = checkpoint["config"]
    print(f"evaluating {args.ckpt} (step {checkpoint['step']}, {config['model']} ViT, "
          f"{'random init' if args.random_init else args.encoder + ' encoder'})")
    device = torch.device(runs.pick_device(args.device))
    encoder = build_frozen_encoder(checkpoint, args.encoder, args.random_init).to(device)
    args.data, args.data_dir = data_source(args, config)

    tag = "random" if args.random_init else args.encoder
    # Everything the features depend on; the file time catches a retrained run at the same step.
    key = {"step": checkpoint["step"], "ckpt_mtime_ns": os.stat(args.ckpt).st_mtime_ns, "data": args.data,
           "data_dir": args.data_dir, "img_size": config["img_size"], "limit": args.limit}
    features = {}
    for split in ("train", "val"):
        dataset = build_dataset(args.data, args.data_dir, split, config["img_size"], augment=False,
                                seed=config.get("seed", 0))
        if split == "train" and args.k > min(len(dataset), args.limit or len(dataset)):
            raise UsageError(f"--k {args.k} is more than the {min(len(dataset), args.limit or len(dataset))} "
                             f"training images: lower --k")
        path = os.path.join(os.path.dirname(args.ckpt), f"features_{tag}_{split}.pt")
        features[split] = cached(None if args.no_cache else path, {**key, "dataset": fingerprint(dataset)},
                                 lambda: features_of_split(encoder, dataset, args, device))
    train_x, train_y = features["train"]["features"], features["train"]["labels"]
    val_x, val_y = features["val"]["features"], features["val"]["labels"]
    num_classes = features["train"]["num_classes"]

    linear = linear_probe(train_x, train_y, val_x, val_y, num_classes)
    knn_scores = knn_classify(train_x, train_y, val_x, num_classes, k=args.k)
    result = {"encoder": args.encoder, "random_init": args.random_init,
              "step": 0 if args.random_init else checkpoint["step"], "ckpt": args.ckpt,
              "data": args.data, "num_classes": num_classes, "num_train": len(train_x),
              "num_val": len(val_x), "feature_dim": train_x.shape[1], "k": args.k,
              "linear_top1": linear["top1"], "knn_top1": topk_accuracy(knn_scores, val_y, 1),
              "best_weight_decay": linear["best_weight_decay"],
              "heldout_top1_by_weight_decay": linear["heldout_top1"]}
    if num_classes > 10:
        result["linear_top5"] = linear["top5"]
        result["knn_top5"] = topk_accuracy(knn_scores, val_y, 5)
    return result


def print_table(result: dict) -> None:
    who = "random-init baseline" if result["random_init"] else f"{result['encoder']} encoder at step {result['step']}"
    print(f"{who}, {result['data']}: {result['num_train']} train / {result['num_val']} val images, "
          f"D={result['feature_dim']}, {result['num_classes']} classes")
    columns = ("top1", "top5") if "linear_top5" in result else ("top1",)
    print(f"{'':<22}" + "".join(f"{'top-' + column[-1]:>8}" for column in columns))
    for prefix, name in (("linear", f"linear (wd {result['best_weight_decay']:g})"), ("knn", f"{result['k']}-NN")):
        print(f"{name:<22}" + "".join(f"{result[f'{prefix}_{column}']:>8.2%}" for column in columns))


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        result = evaluate(args)
        figure = figure_path(args)
        if figure:
            write_figure(args, figure)
    except (UsageError, DataError) as error:
        exit_usage(str(error))
    except KeyboardInterrupt:
        print("eval_probe.py: interrupted", file=sys.stderr)
        sys.exit(130)
    print_table(result)
    if figure:
        print(f"feature maps: {figure}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    return result


if __name__ == "__main__":
    main()
