"""Image datasets for JEPA pre-training and linear probing.

build_dataset(data, data_dir, split, img_size, augment) returns a torch Dataset whose items are
(image, label, skipped):

    image    uint8 tensor (3, img_size, img_size), not normalised: the training loop copies uint8 to
             the device (4x less traffic than float32) and calls normalize() there.
    label    int in [0, num_classes).
    skipped  1 when the file at this index could not be decoded and the next readable file was
             returned in its place, else 0. Summed over an epoch it counts every unreadable file
             exactly once, also with several DataLoader workers.

`data` is "synthetic" (procedural shapes, no files), "cifar10", "imagenet100" or the path of an
image folder. Training augmentation is RandomResizedCrop(scale 0.3-1, ratio 3/4-4/3) plus a
horizontal flip; evaluation resizes the shorter side to img_size / 0.875 and crops the centre.
Random numbers come from torch's global RNG, which DataLoader reseeds differently in every worker
from the main process's seed: runs are reproducible after torch.manual_seed, and workers never
repeat each other's crops.

An optional decoded cache (build_cache, CachedDataset, random_resized_crop_flip) decodes an image
folder once into a uint8 memmap and augments whole batches on the device. It stores the central
square of each image, so on non-square photos the crops come from that square, not the whole image.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pickle
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
EVAL_CROP_FRACTION = 0.875
AUGMENT_SCALE = (0.3, 1.0)
AUGMENT_RATIO = (3 / 4, 4 / 3)
MAX_CONSECUTIVE_FAILURES = 50

# ImageNet-100 of Tian et al., "Contrastive Multiview Coding" (2019), from
# github.com/HobbitLong/CMC/blob/master/imagenet100.txt; solo-learn's
# solo/data/dataset_subset/imagenet100_classes.txt lists the same 100 wnids in the same order.
IMAGENET100_WNIDS = tuple("""
    n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797
    n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653
    n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531
    n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855
    n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051
    n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868
    n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322
    n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029
    n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045
    n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622
""".split())

# The official label order of the CIFAR-10 batches (also the alphabetical order of its class folders).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}

# A truncated file must fail loudly instead of decoding into a half-grey image that trains silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DataError(ValueError):
    """A problem with the data or its options; the message says, in one line, what to change."""


# Decoding: any file Pillow can read becomes 8-bit RGB; anything else raises.

_already_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    # One warning per file and process: a bad file seen every epoch must not flood the log. Our own
    # line on stderr (a Python warning would add this file's name and line, which say nothing to a
    # user), written past any progress bar.
    if key not in _already_warned:
        _already_warned.add(key)
        tqdm.write(f"warning: {message}", file=sys.stderr)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels are composited on black."""
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        # Pillow's own convert clips 16-bit values at 255, which turns most 16-bit images white.
        if img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 256
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        on_black = Image.new("RGB", rgba.size)
        on_black.paste(rgba, mask=rgba.getchannel("A"))
        return on_black
    return img.convert("RGB")


def decode_image(path: str, min_side: int) -> Image.Image:
    """Fully decode the image file at `path` into RGB, or raise.

    JPEGs are decoded at 1/2, 1/4 or 1/8 scale when both sides stay >= min_side, several times
    faster for large photos. Pillow's decompression-bomb warning is raised as an error so that
    oversized files are skipped like any other unreadable file.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.draft("RGB", (min_side, min_side))
            img.load()  # Image.open reads only the header: corrupt and truncated data fail here
            return _to_rgb(img)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def center_crop(img: Image.Image, size: int, shorter_side: int) -> Image.Image:
    """Resize so that the shorter side is `shorter_side`, keep the central size x size square.

    An image that already is size x size is returned unchanged (32 px CIFAR at img_size 32).
    """
    if img.size == (size, size):
        return img
    width, height = img.size
    # Cropping in source coordinates and resampling once equals resize-then-crop, minus one copy.
    side = min(width, height) * size / shorter_side
    left, top = (width - side) / 2, (height - side) / 2
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))


def _random_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """Draw a RandomResizedCrop box (left, top, right, bottom) from torch's global RNG."""
    log_ratio = (math.log(AUGMENT_RATIO[0]), math.log(AUGMENT_RATIO[1]))
    for _ in range(10):
        area = width * height * torch.empty(1).uniform_(*AUGMENT_SCALE).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        crop_w, crop_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(torch.randint(0, width - crop_w + 1, (1,)))
            top = int(torch.randint(0, height - crop_h + 1, (1,)))
            return left, top, left + crop_w, top + crop_h
    # Very elongated images rarely fit a draw: take the largest central box within the ratio range.
    crop_w = max(1, min(width, round(height * AUGMENT_RATIO[1])))
    crop_h = max(1, min(height, round(width / AUGMENT_RATIO[0])))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def random_resized_crop(img: Image.Image, size: int) -> torch.Tensor:
    """RandomResizedCrop(size, scale=(0.3, 1), ratio=(3/4, 4/3)) and a horizontal flip (p=0.5)."""
    box = _random_crop_box(*img.size)
    image = _to_tensor(img.resize((size, size), Image.BILINEAR, box=box))
    return image.flip(-1) if torch.rand(1).item() < 0.5 else image


# Datasets: subclasses only say how to load an RGB image; cropping is shared.


class _ImageDataset(Dataset):
    """Base class: subclasses implement __len__ and _load(index, min_side) -> (RGB, label, skipped)."""

    def __init__(self, classes: list[str], img_size: int, augment: bool):
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.img_size = img_size
        self.augment = augment
        self.eval_resize = round(img_size / EVAL_CROP_FRACTION)
        # A 30%-area crop of a 2*img_size image still has about img_size pixels per side.
        self.decode_side = 2 * img_size if augment else self.eval_resize

    def _load(self, index: int, min_side: int) -> tuple[Image.Image, int, int]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)  # lets plain `for item in dataset` stop
        img, label, skipped = self._load(index, self.decode_side)
        if self.augment:
            return random_resized_crop(img, self.img_size), label, skipped
        return _to_tensor(center_crop(img, self.img_size, self.eval_resize)), label, skipped


class ImageFolderDataset(_ImageDataset):
    """Image files listed as (path, label); unreadable files are replaced by the next readable one."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], img_size: int, augment: bool):
        super().__init__(classes, img_size, augment)
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int, min_side: int) -> tuple[Image.Image, int, int]:
        for offset in range(MAX_CONSECUTIVE_FAILURES):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                return decode_image(path, min_side), label, int(offset > 0)
            # Pillow reports bad files with many types (OSError, SyntaxError, ValueError, EOFError,
            # struct.error, DecompressionBombError, ...): any of them means "skip this file".
            except Exception as error:
                _warn_once(path, f"skipping unreadable image {path}: {type(error).__name__}: {error}")
        raise DataError(f"too many unreadable images near {self.samples[index][0]}: "
                        f"{MAX_CONSECUTIVE_FAILURES} in a row failed to decode; check or re-copy the files")


class ArrayDataset(_ImageDataset):
    """Images held in memory as a uint8 array (N, H, W, 3), e.g. the CIFAR-10 batches."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes, img_size: int, augment: bool):
        super().__init__(classes, img_size, augment)
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int, min_side: int) -> tuple[Image.Image, int, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index]), 0


# Synthetic shapes: a labelled image set rendered on the fly, no files needed.

SHAPES = ("disc", "ring", "square", "triangle", "cross")
TEXTURES = ("stripes", "checks")


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside, in units of the shape's radius) to a shape at the origin."""
    if shape == "disc":
        return np.hypot(u, v) - 1
    if shape == "ring":
        return np.abs(np.hypot(u, v) - 0.7) - 0.3
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if shape == "triangle":  # three half-planes with inradius 0.5: an equilateral triangle
        normals = -np.pi / 2 + 2 * np.pi * np.arange(3) / 3
        return np.max([u * np.cos(a) + v * np.sin(a) for a in normals], axis=0) - 0.5
    horizontal = np.maximum(np.abs(u) - 1, np.abs(v) - 0.3)
    vertical = np.maximum(np.abs(u) - 0.3, np.abs(v) - 1)
    return np.minimum(horizontal, vertical)


def _pattern(texture: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Stripes or checks in [0, 1] with random period, angle and phase; edges about 1 pixel wide."""
    period = rng.uniform(0.1, 0.16)
    angle, phase_x, phase_y = rng.uniform(0, 2 * np.pi, 3)
    along = x * np.cos(angle) + y * np.sin(angle)
    across = y * np.cos(angle) - x * np.sin(angle)
    wave = np.sin(2 * np.pi * along / period + phase_x)
    if texture == "checks":
        wave = wave * np.sin(2 * np.pi * across / period + phase_y)
    return np.clip(0.5 + wave * period * size / (2 * np.pi), 0, 1)


def render_synthetic(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """Render one synthetic image of class `label` as uint8 (size, size, 3).

    The class is (shape, texture): one of 5 dark-outlined shapes (disc, ring, square, triangle,
    cross) filled with one of 2 two-colour textures (stripes, checks); label = 2 * shape + texture.
    Everything else is a nuisance drawn from `rng`: the shape's position, radius (22-34% of the
    image) and rotation; the texture's period, angle, phase and colours (a random colour and
    roughly its complement, so the fill averages to grey in every class); a muted random background
    colour under strong pixel noise; half the time a thin line of random colour as a distractor;
    more pixel noise. The class needs the outline and the
    texture inside it, found at an unknown place: neither mean colour nor any single pixel tells
    it. Geometry is in image units, so every `size` renders the same scene.
    """
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    # Background: a random muted colour under strong pixel noise. Noise cannot be predicted from
    # one part of the image to another, so what a JEPA can learn to predict is the object.
    image = 0.5 + (rng.uniform(0, 1, 3) - 0.5) * 0.6 + rng.normal(0, 0.15, (size, size, 3))
    if rng.random() < 0.5:
        (x0, y0), (dx, dy) = rng.uniform(0, 1, 2), rng.uniform(-1, 1, 2)
        along = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
        line = np.clip(0.5 - (np.hypot(x - x0 - along * dx, y - y0 - along * dy) - 0.015) * size, 0, 1)
        image = image * (1 - line[..., None]) + rng.uniform(0, 1, 3) * line[..., None]

    radius = rng.uniform(0.22, 0.34)
    # Rotated squares and crosses reach 1.15 radii from the centre: keep them inside the image.
    centre_x, centre_y = rng.uniform(1.15 * radius, 1 - 1.15 * radius, 2)
    angle = rng.uniform(0, 2 * np.pi)
    u = ((x - centre_x) * np.cos(angle) + (y - centre_y) * np.sin(angle)) / radius
    v = ((y - centre_y) * np.cos(angle) - (x - centre_x) * np.sin(angle)) / radius
    edge_pixels = _shape_distance(SHAPES[label // 2], u, v) * radius * size
    inside = np.clip(0.5 - edge_pixels, 0, 1)[..., None]
    outline = np.clip(0.03 * size + 0.5 - np.abs(edge_pixels), 0, 1)[..., None]
    colour_a = rng.uniform(0, 1, 3)
    colour_b = np.clip(1 - colour_a + rng.uniform(-0.2, 0.2, 3), 0, 1)
    texture = _pattern(TEXTURES[label % 2], x - centre_x, y - centre_y, rng, size)[..., None]
    image = image * (1 - inside) + (texture * colour_a + (1 - texture) * colour_b) * inside
    image = image * (1 - outline) + 0.05 * outline + rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


class SyntheticShapes(_ImageDataset):
    """10 classes of procedural shapes (see render_synthetic): 20,000 train and 4,000 val images.

    Image i of a split is rendered from the seed (seed, split, i), so it is the same in every
    epoch, worker and run, and val images come from a different stream than train images.
    Labels cycle through the classes (label = i mod 10), so every split is balanced.
    """

    LENGTHS = {"train": 20_000, "val": 4_000}

    def __init__(self, split: str, img_size: int, augment: bool, seed: int = 0):
        super().__init__([f"{shape}-{texture}" for shape in SHAPES for texture in TEXTURES], img_size, augment)
        self.split, self.seed = split, seed

    def __len__(self) -> int:
        return self.LENGTHS[self.split]

    def _load(self, index: int, min_side: int) -> tuple[Image.Image, int, int]:
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, ("train", "val").index(self.split), index])
        return Image.fromarray(render_synthetic(rng, label, self.img_size)), label, 0


# Finding files on disk.


def _image_files(folder: Path) -> list[str]:
    # Hidden files are skipped: "._x.jpg" AppleDouble files are metadata, not images.
    return sorted(str(folder / name) for name in os.listdir(folder)
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)


def _class_images(folder: Path) -> dict[str, list[str]]:
    """Images of each non-empty class sub-folder of `folder`, by class name; warns about empty ones."""
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    images = {name: _image_files(folder / name) for name in names}
    empty = [name for name in names if not images[name]]
    if empty:
        _warn_once(f"empty:{folder}", f"ignoring {len(empty)} class folder(s) without images in {folder}: "
                   + ", ".join(empty))
    return {name: files for name, files in images.items() if files}


def _image_folder(root: Path, split: str, img_size: int, augment: bool) -> ImageFolderDataset:
    """Dataset from root/{train, val or test}/<class>/<image> or, without train/, root/<class>/<image>.

    Without train/, the images of each class sorted by file name are split deterministically:
    every 10th one (positions 9, 19, ...) goes to val, the others to train. Class labels follow
    the sorted names of the (train) class folders that hold images.
    """
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist: "
                        "pass an existing folder or one of synthetic, cifar10, imagenet100")
    if (root / "train").is_dir():
        val_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
        if val_dir is None:
            raise DataError(f"{root} has train/ but no val/ or test/: add one with the same class folders")
        train_images = _class_images(root / "train")
        split_images = train_images if split == "train" else _class_images(val_dir)
        classes = sorted(train_images)
        samples = [(path, label) for label, name in enumerate(classes) for path in split_images.get(name, [])]
        unknown = sorted(set(split_images) - set(classes))
        if unknown:
            _warn_once(f"unknown:{root}", f"ignoring {split} class folder(s) that train/ does not have in {root}: "
                                          f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    else:
        images = _class_images(root)
        classes = sorted(images)
        samples = [(path, label) for label, name in enumerate(classes)
                   for position, path in enumerate(images[name]) if (position % 10 == 9) == (split == "val")]
    if not classes:
        raise DataError(f"no class folders with images in {root}: expected <class>/<image> files with extensions "
                        + " ".join(sorted(IMAGE_EXTENSIONS)))
    if not samples:
        raise DataError(f"no {split} images found in {root}: add images (val takes every 10th image of a class)")
    return ImageFolderDataset(samples, classes, img_size, augment)


def _search_roots(data_dir: str | None, env_var: str, defaults: tuple[str, ...]) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    return [Path(path) for path in (os.environ.get(env_var), *defaults) if path]


def _load_cifar10_batches(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) and labels from cifar-10-python.tar.gz or its cifar-10-batches-py folder.

    The batches are pickles, and unpickling can run code: use only the official archive.
    """
    names = CIFAR10_BATCHES[split]
    if source.is_file():
        with tarfile.open(source, "r:gz") as archive:
            blobs = {os.path.basename(member.name): archive.extractfile(member).read()
                     for member in archive.getmembers() if os.path.basename(member.name) in names}
    else:
        blobs = {name: (source / name).read_bytes() for name in names if (source / name).is_file()}
    missing = [name for name in names if name not in blobs]
    if missing:
        raise DataError(f"CIFAR-10 at {source} lacks {', '.join(missing)}: re-download cifar-10-python.tar.gz")
    batches = [pickle.loads(blobs[name], encoding="bytes") for name in names]
    images = np.concatenate([np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32) for batch in batches])
    labels = np.concatenate([np.asarray(batch[b"labels"], np.int64) for batch in batches])
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels


def _cifar10(data_dir: str | None, split: str, img_size: int, augment: bool) -> _ImageDataset:
    """CIFAR-10 from the python archive, its extracted folder, or an image folder with train/ and test/."""
    roots = _search_roots(data_dir, "CIFAR10_DIR", ("data/cifar10", "../shared/data/cifar10"))
    for root in roots:
        for source in (root, root / "cifar-10-batches-py", root / "cifar-10-python.tar.gz"):
            is_archive = source.is_file() and source.name.endswith((".tar.gz", ".tgz"))
            if is_archive or (source / "data_batch_1").is_file():
                images, labels = _load_cifar10_batches(source, split)
                return ArrayDataset(images, labels, CIFAR10_CLASSES, img_size, augment)
        if (root / "train").is_dir():
            return _image_folder(root, split, img_size, augment)
    raise DataError(f"CIFAR-10 not found in {', '.join(map(str, roots))}: pass --data-dir DIR or set "
                    "CIFAR10_DIR=DIR, with cifar-10-python.tar.gz, cifar-10-batches-py/ "
                    "or train/ and test/ class folders in DIR")


def _imagenet100(data_dir: str | None, split: str, img_size: int, augment: bool) -> ImageFolderDataset:
    """The ImageNet-100 classes of an ImageNet root laid out as <root>/{train,val}/<wnid>/<image>.

    The root may hold all 1000 ImageNet-1k classes or just these 100. Labels follow sorted wnids.
    """
    roots = _search_roots(data_dir, "IMAGENET_DIR", ("data/imagenet",))
    most_found, best_dir = 0, roots[0] / split
    for root in roots:
        split_dir = root / split
        found = [wnid for wnid in IMAGENET100_WNIDS if (split_dir / wnid).is_dir()]
        if len(found) == len(IMAGENET100_WNIDS):
            classes = sorted(found)
            samples = [(path, label) for label, wnid in enumerate(classes)
                       for path in _image_files(split_dir / wnid)]
            return ImageFolderDataset(samples, classes, img_size, augment)
        if len(found) > most_found:
            most_found, best_dir = len(found), split_dir
    raise DataError(f"found {most_found} of {len(IMAGENET100_WNIDS)} ImageNet-100 classes in {best_dir} "
                    f"(looked in {', '.join(map(str, roots))}): pass --data-dir DIR or set IMAGENET_DIR=DIR, "
                    f"where DIR/{split}/<wnid>/ holds the images")


def build_dataset(data: str, data_dir: str | None, split: str, img_size: int, augment: bool,
                  seed: int = 0) -> Dataset:
    """The dataset named `data` ("synthetic", "cifar10", "imagenet100" or an image folder path).

    split is "train" or "val"; augment=True gives random resized crops and flips, False the
    centre crop; seed only affects "synthetic". Items are (uint8 image (3, img_size, img_size),
    label, skipped) as described at the top of this module; the dataset has .classes and
    .num_classes. Raises DataError, with what to change, when the data cannot be found.
    """
    if split not in ("train", "val"):
        raise DataError(f"unknown split {split!r}: use train or val")
    if data == "synthetic":
        return SyntheticShapes(split, img_size, augment, seed)
    if data == "cifar10":
        return _cifar10(data_dir, split, img_size, augment)
    if data == "imagenet100":
        return _imagenet100(data_dir, split, img_size, augment)
    if os.path.exists(data) or os.sep in data:
        return _image_folder(Path(data), split, img_size, augment)
    raise DataError(f"unknown --data {data!r}: use synthetic, cifar10, imagenet100 or a path to an image folder")


def fingerprint(dataset: Dataset) -> str:
    """A short hash of what `dataset` holds, for the keys of caches derived from it: its kind, size
    and classes, and every (file, label) of a folder, the labels of an in-memory array, or the seed
    and split of the synthetic set. A folder that gains, loses or relabels a file changes it."""
    parts = [type(dataset).__name__, len(dataset), getattr(dataset, "classes", None)]
    if isinstance(dataset, ImageFolderDataset):
        parts.append(dataset.samples)
    elif isinstance(dataset, ArrayDataset):
        parts.append(hashlib.sha1(np.ascontiguousarray(dataset.labels).tobytes()).hexdigest())
    elif isinstance(dataset, SyntheticShapes):
        parts.append((dataset.seed, dataset.split))
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


@functools.cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device: creating them in every call would add a host-to-device copy per step.
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255)


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 (or float in 0..255) on any device -> float32 (x / 255 - MEAN) / STD."""
    mean, std = _mean_std(images_uint8.device)
    return (images_uint8.float() - mean) / std


# Optional decoded cache: decode once, then read uint8 squares and augment on the device.


class _CacheSource(Dataset):
    """Centre squares (size, size, 3) of a dataset's images, for decoding in DataLoader workers."""

    def __init__(self, dataset: _ImageDataset, size: int):
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        img, label, _ = self.dataset._load(index, self.size)
        return np.array(center_crop(img, self.size, self.size), dtype=np.uint8), label


def build_cache(dataset: Dataset, path: str, size: int) -> np.memmap:
    """Decode every image of a dataset from build_dataset once into a uint8 memmap (N, size, size, 3).

    Each image's shorter side is resized to `size` and the central square kept. The array is a
    .npy file at `path`, labels go to `path + ".labels.npy"`. Both are written under temporary
    names and renamed when complete, so an interrupted run never leaves a cache that looks valid;
    an existing cache with the same number of images and size is reused. Unreadable files are
    replaced by the next readable one, as in the dataset itself.
    """
    labels_path = path + ".labels.npy"
    count = len(dataset)
    if os.path.exists(path) and os.path.exists(labels_path):
        images = np.load(path, mmap_mode="r")
        if images.shape == (count, size, size, 3) and len(np.load(labels_path)) == count:
            return images
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        _decode_into(dataset, size, temporary, labels_path)
    except BaseException:  # Ctrl-C or an error: leave no half-written file of the size of the dataset
        for leftover in (temporary, labels_path + ".tmp"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise
    os.replace(temporary, path)
    return np.load(path, mmap_mode="r")


def _decode_into(dataset: Dataset, size: int, images_path: str, labels_path: str) -> None:
    """build_cache's work: the images into the .npy at `images_path`, then the labels, written whole."""
    count = len(dataset)
    images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(count, size, size, 3))
    labels = np.empty(count, np.int64)
    loader = DataLoader(_CacheSource(dataset, size), batch_size=64, num_workers=min(8, os.cpu_count() or 1))
    start = 0
    with tqdm(total=count, desc=f"decoding {count} images into the uint8 cache", unit="img") as progress:
        for batch_images, batch_labels in loader:
            images[start:start + len(batch_images)] = batch_images.numpy()
            labels[start:start + len(batch_labels)] = batch_labels.numpy()
            start += len(batch_images)
            progress.update(len(batch_images))
    images.flush()
    del images
    with open(labels_path + ".tmp", "wb") as file:
        np.save(file, labels)
    # The labels go first: the images file appearing last (build_cache's rename) marks the cache complete.
    os.replace(labels_path + ".tmp", labels_path)


class CachedDataset(Dataset):
    """Items (uint8 image (3, size, size), label, 0) read straight from a cache made by build_cache."""

    def __init__(self, path: str, classes: list[str]):
        self.path = path
        self.labels = np.load(path + ".labels.npy")
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        # Opened lazily: each DataLoader worker maps the file itself instead of receiving a pickled copy.
        self._images = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        image = torch.from_numpy(np.ascontiguousarray(self._images[index].transpose(2, 0, 1)))
        return image, int(self.labels[index]), 0


def crop_boxes(batch: int, scale, ratio, device, generator=None, tries: int = 10):
    """RandomResizedCrop boxes for `batch` square images, as fractions of the side:
    area ~ U(scale), log aspect ~ U(log ratio), width = sqrt(area * aspect), height = sqrt(area / aspect),
    redrawn (up to `tries` draws, all made at once) until both sides fit, else the whole image.
    Returns width, height and the centre x, y, each (B,), in affine_grid's coordinates (image = [-1, 1]).
    """
    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, *shape, device=device, generator=generator)

    area = uniform(*scale, tries)                                                     # (B, tries)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), tries))
    width, height = (area * aspect).sqrt(), (area / aspect).sqrt()
    fits = (width <= 1) & (height <= 1)
    first = fits.int().argmax(1, keepdim=True)                                        # (B, 1): first box that fits
    found = fits.any(1)
    width = torch.where(found, width.gather(1, first).squeeze(1), 1.0)               # (B,)
    height = torch.where(found, height.gather(1, first).squeeze(1), 1.0)
    return width, height, uniform(-1, 1) * (1 - width), uniform(-1, 1) * (1 - height)


def random_resized_crop_flip(images_uint8: torch.Tensor, out_size: int, scale=AUGMENT_SCALE, ratio=AUGMENT_RATIO,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched RandomResizedCrop + horizontal flip (p=0.5) of square images, on their device.

    (B, 3, side, side) uint8 -> (B, 3, out_size, out_size) float32 in 0..255 (normalize() accepts it).
    Boxes are drawn as in RandomResizedCrop and `_random_crop_box` (see `crop_boxes`). Sampling is
    bilinear without antialiasing, which is fine when out_size is not much smaller than side.
    `generator`, if given, must be on the same device.
    """
    batch, device = images_uint8.shape[0], images_uint8.device
    width, height, centre_x, centre_y = crop_boxes(batch, scale, ratio, device, generator)
    flip = torch.where(torch.rand(batch, device=device, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(theta, [batch, 3, out_size, out_size], align_corners=False)
    return F.grid_sample(images_uint8.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
