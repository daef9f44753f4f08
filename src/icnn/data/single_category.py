"""The paper's single-category task (§5.1): object crops of the target category (label 1)
against negative images (label 0).

``classes = ["negative", <target name>]``; ``landmark_names``/``part_names`` are the positives';
negatives get NaN landmarks, NaN box and all-False masks. The sample order is fixed by ``seed``
(positives and negatives interleaved by one seeded permutation), so two datasets built with the
same arguments are identical.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class SingleCategory(Dataset):
    """Positives (any dataset of the sample contract, every sample a target object) vs negatives.

    Args:
        positives: the target's samples (their labels are replaced by 1).
        negatives: negative samples (labels replaced by 0), e.g. :class:`NegativeImages`.
        name: the target's class name (default: ``positives.classes[0]`` when it has one class).
        balance: None (keep all), ``"undersample"`` (drop samples of the larger side to the
            smaller's count) or ``"oversample"`` (repeat the smaller side's samples, cycling
            through a seeded permutation, up to the larger's count).
        max_positives, max_negatives: keep at most this many of each (seeded subsample), applied
            before balancing.
        seed: fixes subsampling and the order.
    """

    def __init__(
        self,
        positives: Dataset,
        negatives: Dataset,
        *,
        name: str | None = None,
        balance: str | None = None,
        max_positives: int | None = None,
        max_negatives: int | None = None,
        seed: int = 0,
    ):
        if balance not in (None, "undersample", "oversample"):
            raise ValueError(f"balance must be None, 'undersample' or 'oversample', got {balance!r}")
        size_p, size_n = tuple(positives.image_size), tuple(negatives.image_size)
        if size_p != size_n:
            raise ValueError(f"positives are {size_p} but negatives {size_n}: build both with the same image_size")
        if name is None:
            classes = list(getattr(positives, "classes", []))
            name = classes[0] if len(classes) == 1 else "positive"
        self.positives, self.negatives = positives, negatives
        self.classes = ["negative", name]
        self.landmark_names = list(positives.landmark_names)
        self.part_names = list(getattr(positives, "part_names", []))
        self.image_size = size_p
        rng = np.random.default_rng(seed)

        def pick(n: int, limit: int | None) -> np.ndarray:
            idx = np.arange(n)
            if limit is not None and limit < n:
                idx = np.sort(rng.choice(n, size=limit, replace=False))
            return idx

        pos = pick(len(positives), max_positives)
        neg = pick(len(negatives), max_negatives)
        if balance is not None and len(pos) and len(neg):
            target = min(len(pos), len(neg)) if balance == "undersample" else max(len(pos), len(neg))

            def resize(idx: np.ndarray) -> np.ndarray:
                if target <= len(idx):
                    return np.sort(rng.choice(idx, size=target, replace=False))
                reps = -(-target // len(idx))
                return np.concatenate([rng.permutation(idx) for _ in range(reps)])[:target]

            pos, neg = resize(pos), resize(neg)
        # (source, index) pairs: source 1 = positives, 0 = negatives
        items = np.concatenate([np.stack((np.ones_like(pos), pos), 1), np.stack((np.zeros_like(neg), neg), 1)])
        self.items = items[rng.permutation(len(items))] if len(items) else items.reshape(0, 2)
        self.num_positives, self.num_negatives = len(pos), len(neg)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        source, j = (int(v) for v in self.items[index])
        sample = dict((self.positives if source else self.negatives)[j])
        h, w = self.image_size
        sample["label"] = torch.tensor(source, dtype=torch.int64)
        sample["index"] = torch.tensor(index, dtype=torch.int64)
        if not source:
            sample["box"] = torch.full((4,), float("nan"))
            sample["landmarks"] = torch.full((len(self.landmark_names), 2), float("nan"))
            if self.part_names:
                sample["part_masks"] = torch.zeros((len(self.part_names), h, w), dtype=torch.bool)
            else:
                sample.pop("part_masks", None)
        return sample

    def __repr__(self) -> str:
        return (
            f"SingleCategory({self.classes[1]!r}: {self.num_positives} positives, "
            f"{self.num_negatives} negatives, image_size={self.image_size})"
        )

