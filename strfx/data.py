"""``--data`` for ``strfx train``: turn a data spec into (train, val) datasets, never downloading.

Schemes (PATH is a local path):

* ``demo`` — the MNIST subset shipped in the package (``strfx/data/mnist_demo.npz``);
* ``npz:PATH`` — arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 images N×H×W,
  N×C×H×W or N×H×W×C; integer labels), read with ``allow_pickle=False``;
* ``mnist:PATH`` / ``cifar10:PATH`` — torchvision's MNIST / CIFAR10 folders under PATH
  (``download=False``);
* ``imagefolder:PATH`` — ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``;
* no ``--data`` — the model file's ``datasets()`` returning ``(train, val)``.

Array data (npz, demo) lives in memory as uint8 and is converted a whole batch at a time
(:class:`ArrayDataset` accepts a list of indices), which keeps small-image training fast on CPU.
Every failure is a one-line :class:`~strfx.errors.DataError` naming the path.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from strfx.errors import DataError

SCHEMES = ("demo", "npz:", "mnist:", "cifar10:", "imagefolder:")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class ArrayDataset(Dataset):
    """uint8 images (N×C×H×W) + labels; ``ds[list_of_indices]`` returns a whole normalized batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.classes = list(range(int(labels.max()) + 1)) if len(labels) else []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        single = isinstance(index, int)
        idx = torch.as_tensor([index] if single else index, dtype=torch.long)
        x = (self.images[idx].float().div_(255) - self.mean) / self.std
        y = self.labels[idx]
        return (x[0], y[0]) if single else (x, y)


@dataclass
class Data:
    """Resolved training data."""

    train: Dataset
    val: Dataset
    num_classes: int | None  # None when it cannot be known without reading every label
    source: str  # what the user asked for, for messages and the config
    batched: bool  # datasets accept a list of indices (ArrayDataset)
    preprocessing: dict[str, Any] | None = None  # raw/scale/mean/std/resize, for the input contract


def _as_nchw(x: np.ndarray, path: str, key: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[1] in (1, 3) or x.shape[-1] not in (1, 3):
            return x
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # N×H×W×C
    raise DataError(f"{path}: {key} has shape {x.shape}; expected images N×H×W, N×C×H×W or N×H×W×C")


def _as_uint8(x: np.ndarray, path: str, key: str) -> np.ndarray:
    """Images as uint8: integer arrays within 0..255 are converted, anything else is refused, never cast."""
    if x.dtype == np.uint8:
        return x
    fix = "store the images as uint8 (0..255)"
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if 0 <= lo and hi <= 255:
            return x.astype(np.uint8)
        raise DataError(f"{path}: {key} ({x.dtype}) has values {lo}..{hi}, outside 0..255; {fix}")
    if np.issubdtype(x.dtype, np.floating):
        finite = np.isfinite(x)
        problems = []
        if np.isnan(x).any():
            problems.append("NaN")
        if np.isinf(x).any():
            problems.append("inf")
        vals = x[finite]
        if vals.size:
            problems.append(f"values {float(vals.min()):g}..{float(vals.max()):g}")
        raise DataError(f"{path}: {key} has dtype {x.dtype} ({', '.join(problems)}); strfx scales images by /255 "
                        f"from uint8 and never casts floats silently; {fix} (e.g. (x * 255).round().astype(np.uint8) "
                        f"for images in 0..1)")
    raise DataError(f"{path}: {key} has dtype {x.dtype}; {fix}")


def arrays_to_data(arrays: dict[str, np.ndarray], path: str, source: str) -> Data:
    """Validate npz-style arrays and wrap them (normalization statistics come from x_train)."""
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks array(s) {', '.join(missing)} (found: {', '.join(sorted(arrays)) or 'none'}); "
                        f"an npz needs {', '.join(NPZ_KEYS)}")
    xs = {k: _as_nchw(np.asarray(arrays[k]), path, k) for k in ("x_train", "x_test")}
    ys = {k: np.asarray(arrays[k]) for k in ("y_train", "y_test")}
    for xk, yk in (("x_train", "y_train"), ("x_test", "y_test")):
        if ys[yk].ndim != 1 or len(ys[yk]) != len(xs[xk]):
            raise DataError(f"{path}: {yk} has shape {ys[yk].shape} but {xk} has {len(xs[xk])} images; "
                            f"labels must be a 1-D array with one integer per image")
        if not np.issubdtype(ys[yk].dtype, np.integer) or (len(ys[yk]) and ys[yk].min() < 0):
            raise DataError(f"{path}: {yk} must hold non-negative integer class labels (dtype {ys[yk].dtype})")
        if len(xs[xk]) == 0:
            raise DataError(f"{path}: {xk} is empty")
    if xs["x_train"].shape[1:] != xs["x_test"].shape[1:]:
        raise DataError(f"{path}: x_train images are {xs['x_train'].shape[1:]} but x_test images are "
                        f"{xs['x_test'].shape[1:]}; both splits need the same image shape")
    xs = {k: _as_uint8(x, path, k) for k, x in xs.items()}
    train_x = torch.from_numpy(np.ascontiguousarray(xs["x_train"]))
    scaled = train_x.float().div_(255)
    mean = scaled.mean(dim=(0, 2, 3)).tolist()
    std = scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    train = ArrayDataset(train_x, torch.from_numpy(ys["y_train"].astype(np.int64)), mean, std)
    val = ArrayDataset(torch.from_numpy(np.ascontiguousarray(xs["x_test"])),
                       torch.from_numpy(ys["y_test"].astype(np.int64)), mean, std)
    num_classes = int(max(ys["y_train"].max(), ys["y_test"].max())) + 1
    pre = {"raw": f"uint8 pixels 0..255, N×{'×'.join(map(str, train_x.shape[1:]))}", "scale": 1 / 255,
           "mean": mean, "std": std}
    return Data(train, val, num_classes, source, batched=True, preprocessing=pre)


def load_npz(path: Path, source: str) -> Data:
    if not path.exists():
        raise DataError(f"data file not found: {path} (from --data {source})")
    if path.is_dir():
        raise DataError(f"{path} is a directory; npz:PATH needs a .npz file with {', '.join(NPZ_KEYS)}")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic == b"\x93NUMPY":
        raise DataError(f"{path} is a single .npy array, not an .npz archive with {', '.join(NPZ_KEYS)}; "
                        f"save one with np.savez")
    if not zipfile.is_zipfile(path):  # numpy would try it as a pickle and suggest loading it unsafely
        raise DataError(f"{path} is not an .npz archive (not a zip file); save the arrays {', '.join(NPZ_KEYS)} "
                        f"with np.savez")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        from strfx.safeload import reason

        raise DataError(f"cannot read {path} as an .npz archive ({reason(err)}); an array of Python objects is "
                        f"never loaded: store numeric arrays with np.savez") from None
    return arrays_to_data(arrays, str(path), source)


def demo_path() -> Path:
    return Path(str(resources.files("strfx") / "data" / "mnist_demo.npz"))


def _image_transforms(size: tuple[int, int], train: bool, mean: Sequence[float], std: Sequence[float],
                      kind: str) -> Callable[[Any], torch.Tensor]:
    from strfx._torchvision import torchvision

    T = torchvision.transforms
    steps: list[Any] = []
    if kind == "imagefolder":
        if train:
            steps += [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        else:
            steps += [T.Resize(tuple(int(round(s / 0.875)) for s in size)), T.CenterCrop(size)]
    elif kind == "cifar10" and train:
        steps += [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]
    elif kind in ("cifar10", "mnist") and tuple(size) != {"cifar10": (32, 32), "mnist": (28, 28)}[kind]:
        steps += [T.Resize(size)]
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def _torchvision_dataset(kind: str, root: Path, source: str, size: tuple[int, int], channels: int) -> Data:
    from strfx._torchvision import torchvision

    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (from --data {source})")
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[kind]
    stats = {"mnist": ((0.1307,), (0.3081,)), "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}[kind]
    layout = {"mnist": f"{root}/MNIST/raw/train-images-idx3-ubyte (torchvision's MNIST layout)",
              "cifar10": f"{root}/cifar-10-batches-py/ (torchvision's CIFAR10 layout)"}[kind]
    try:
        train = cls(str(root), train=True, download=False, transform=_image_transforms(size, True, *stats, kind=kind))
        val = cls(str(root), train=False, download=False, transform=_image_transforms(size, False, *stats, kind=kind))
    except (RuntimeError, OSError):
        raise DataError(f"no {kind} data under {root}: expected {layout}; strfx never downloads, "
                        "fetch it yourself") from None
    resize = None if tuple(size) == {"cifar10": (32, 32), "mnist": (28, 28)}[kind] else f"resize to {size[0]}×{size[1]}"
    pre = {"raw": f"torchvision {kind} images (uint8 pixels 0..255)", "scale": 1 / 255, "mean": list(stats[0]),
           "std": list(stats[1]), "resize": resize}
    return Data(train, val, len(train.classes), source, batched=False, preprocessing=pre)


def _imagefolder(root: Path, source: str, size: tuple[int, int]) -> Data:
    from strfx._torchvision import torchvision

    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (from --data {source})")
    parts = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"{root} has no {split}/ folder; imagefolder:PATH needs PATH/train/<class>/<image> "
                            f"and PATH/val/<class>/<image>")
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        try:
            parts[split] = torchvision.datasets.ImageFolder(
                str(folder), transform=_image_transforms(size, split == "train", mean, std, "imagefolder"))
        except (FileNotFoundError, RuntimeError) as err:
            raise DataError(f"{folder}: {str(err).splitlines()[0]}; expected one sub-folder of images per class") from None
    if parts["train"].classes != parts["val"].classes:
        raise DataError(f"{root}: train/ has classes {parts['train'].classes[:5]}... but val/ has "
                        f"{parts['val'].classes[:5]}...; both splits need the same class folders")
    resize = f"resize to {int(round(size[0] / 0.875))}, center crop {size[0]}×{size[1]} (RGB)"
    pre = {"raw": "image files (uint8 pixels 0..255)", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
           "std": [0.229, 0.224, 0.225], "resize": resize}
    return Data(parts["train"], parts["val"], len(parts["train"].classes), source, batched=False, preprocessing=pre)


def load_data(spec: str | None, datasets_hook: Callable[[], Any] | None = None,
              image_size: tuple[int, int] = (224, 224), channels: int = 3, model_file: str = "MODEL") -> Data:
    """Resolve ``--data`` (see the module doc). ``datasets_hook`` is the model file's ``datasets()``."""
    if spec is None or spec == "":
        if datasets_hook is None:
            raise DataError(f"no --data given and {model_file} defines no datasets(); pass --data demo, "
                            f"npz:PATH, mnist:PATH, cifar10:PATH or imagefolder:PATH")
        try:
            pair = datasets_hook()
        except Exception as err:  # noqa: BLE001 - the user's function may raise anything
            raise DataError(f"datasets() in {model_file} raised {type(err).__name__}: {err}") from err
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(d, Dataset) for d in pair)):
            raise DataError(f"datasets() in {model_file} must return (train_dataset, val_dataset), "
                            f"got {type(pair).__name__}")
        classes = getattr(pair[0], "classes", None)
        return Data(pair[0], pair[1], len(classes) if classes else None, "datasets()", batched=False)
    if spec == "demo":
        return load_npz(demo_path(), spec)
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest or scheme + ":" not in SCHEMES:
        raise DataError(f"unknown --data {spec!r}; use demo, npz:PATH, mnist:PATH, cifar10:PATH or imagefolder:PATH "
                        f"(or omit --data to use the model file's datasets())")
    path = Path(rest).expanduser().resolve()
    if scheme == "npz":
        return load_npz(path, spec)
    if scheme == "imagefolder":
        return _imagefolder(path, spec, image_size)
    return _torchvision_dataset(scheme, path, spec, image_size, channels)
