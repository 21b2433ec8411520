"""Build strfx/data/mnist_demo.npz: the small MNIST subset `strfx train --data demo` ships with.

Why: `make demo` must run on a user's machine with nothing downloaded, so a few thousand MNIST
digits travel inside the package (compressed uint8, ~1 MB). The subset is class-balanced and drawn
with a fixed seed, so re-running this script reproduces the file byte for byte.

    python tools/make_demo_data.py [--source ../shared/datasets/mnist.npz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS = 400  # 4000 training images
TEST_PER_CLASS = 100  # 1000 test images


def balanced(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)]
    return rng.permutation(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist.npz")
    parser.add_argument("--out", type=Path, default=ROOT / "strfx" / "data" / "mnist_demo.npz")
    args = parser.parse_args()
    with np.load(args.source, allow_pickle=False) as f:
        x_train, y_train, x_test, y_test = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    rng = np.random.default_rng(20200101)
    tr, te = balanced(y_train, TRAIN_PER_CLASS, rng), balanced(y_test, TEST_PER_CLASS, rng)
    np.savez_compressed(
        args.out,
        x_train=x_train[tr].astype(np.uint8), y_train=y_train[tr].astype(np.uint8),
        x_test=x_test[te].astype(np.uint8), y_test=y_test[te].astype(np.uint8),
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {len(tr)} train, {len(te)} test images")


if __name__ == "__main__":
    main()
