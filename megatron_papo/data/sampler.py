"""PromptSampler: a deterministic, resumable stream of prompt batches sharded over data parallel.

The sampler reads one endless stream of dataset indices: epoch 0's order, then epoch 1's, ...
Each epoch's order is a permutation seeded by ``(seed, epoch)`` (identity when shuffle=False).
A global batch is the next `batch_size` indices of the stream; a batch may straddle two epochs,
so every sample is used exactly once per epoch and nothing is dropped. Data-parallel rank r
receives the r-th contiguous slice of each global batch.

The global stream depends only on (num_samples, seed, shuffle), never on dp_size or on the batch
size, so a run resumed from ``state_dict()`` (epoch, position) continues with exactly the same
prompts, even on a different number of data-parallel ranks.

The permutation uses Python's `random.Random` (Mersenne Twister, whose seeded output Python keeps
stable across versions and platforms), seeded with a hash of (seed, epoch).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for one epoch's order, a function of (seed, epoch) only."""
    digest = hashlib.blake2b(f"papo-data:{int(seed)}:{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order in which epoch `epoch` visits the indices 0..num_samples-1."""
    order = list(range(num_samples))
    if shuffle:
        random.Random(epoch_seed(seed, epoch)).shuffle(order)
    return order


def answer_balanced_weights(answers: Sequence[Hashable], alpha: float) -> torch.Tensor:
    """[N] float64 sampling weights, ``count(answer_i) ** -alpha`` normalised to sum 1.

    alpha = 0: every row equally likely (the answers' natural frequencies); alpha = 1: every
    distinct answer equally likely (a frequent answer's rows share its mass), which takes the
    label prior away from a text-only guess; values between interpolate. Answers are compared
    as given (the dataset's normalised text); pass (question, answer) pairs to balance the
    answers of each question text (no answer is then predictable from the question alone).
    """
    if not answers:
        raise ValueError("answer_balanced_weights needs at least one answer")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    counts = Counter(answers)
    w = torch.tensor([counts[a] ** -alpha for a in answers], dtype=torch.float64)
    return w / w.sum()


@dataclass
class PromptSampler:
    """Yields this rank's share of each global batch of dataset indices (module docstring)."""

    num_samples: int
    batch_size: int
    """Global batch size (prompts per step over all data-parallel ranks)."""
    seed: int = 0
    shuffle: bool = True
    dp_rank: int = 0
    dp_size: int = 1
    epoch: int = field(init=False, default=0)
    """Epoch the next index comes from."""
    position: int = field(init=False, default=0)
    """Position of the next index inside that epoch's order."""
    _order: list[int] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dp_size < 1 or not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got {self.dp_rank} and {self.dp_size}")
        if self.batch_size % self.dp_size:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by dp_size {self.dp_size}")
        self._start_epoch(0)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.dp_size

    @property
    def batches_per_epoch(self) -> float:
        """Global batches per pass over the data (fractional when batches straddle epochs)."""
        return self.num_samples / self.batch_size

    def next_global_batch(self) -> list[int]:
        """The next `batch_size` indices of the stream (advances the sampler)."""
        batch: list[int] = []
        while len(batch) < self.batch_size:
            take = min(self.batch_size - len(batch), self.num_samples - self.position)
            batch.extend(self._order[self.position : self.position + take])
            self.position += take
            if self.position == self.num_samples:
                self._start_epoch(self.epoch + 1)
        return batch

    def next_batch(self) -> list[int]:
        """This rank's slice of the next global batch (advances the sampler)."""
        batch = self.next_global_batch()
        start = self.dp_rank * self.local_batch_size
        return batch[start : start + self.local_batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        """Endless: this rank's batches, one per step."""
        while True:
            yield self.next_batch()

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0
        self._order = epoch_order(self.num_samples, self.seed, epoch, self.shuffle)

    # ----------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands, plus what defines the stream (checked on load)."""
        return {"epoch": self.epoch, "position": self.position, "num_samples": self.num_samples,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; raises if the data or the seed differ from the saved run."""
        for key in ("num_samples", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data sampler: saved {key}={state[key]!r}, "
                                 f"this run has {getattr(self, key)!r} (a different dataset or seed "
                                 f"would silently change the prompts)")
        position = int(state["position"])
        if not 0 <= position < self.num_samples:
            raise ValueError(f"saved sampler position {position} out of range for {self.num_samples} samples")
        self._start_epoch(int(state["epoch"]))
        self.position = position


__all__ = ["PromptSampler", "answer_balanced_weights", "epoch_order", "epoch_seed"]
