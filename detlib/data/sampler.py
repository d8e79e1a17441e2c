"""A deterministic, resumable, rank-aware batch sampler for iteration-based training.

The batch of iteration ``i`` is a pure function of ``(seed, i)``: epoch ``i // batches_per_epoch``
shuffles with its own seed, so resuming at ``start_iter`` reproduces the exact data order without
storing any sampler state beyond the iteration. Under DDP each rank takes its slice of the same
global batch. Each item is ``(index, aug_seed)`` so augmentation is deterministic too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


class TrainBatchSampler(Sampler):
    """Yields this rank's batch of ``(dataset index, augmentation seed)`` for iterations ``start_iter, ...``.

    With ``group_ids`` (e.g. 0 for landscape, 1 for portrait images) every batch holds one group
    only, as torchvision's ``GroupedBatchSampler`` does, so padding is small. An epoch has as many
    batches as without groups (``size // global batch``): each group's full batches, then, as in
    torchvision, the groups' partial last batches (most images first, ties in a seeded order), each
    filled up with earlier images of its own group. A group with fewer images than one global batch
    could never fill a batch of its own; it falls back to sharing the largest group's batches
    (logged), so no image is starved and no epoch is empty.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int = 0,
        start_iter: int = 0,
        max_iters: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        group_ids: Sequence[int] | None = None,
    ) -> None:
        if size < batch_size * world_size:
            raise ValueError(f"dataset of {size} images is smaller than one global batch ({batch_size} x {world_size})")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_iter, self.max_iters = start_iter, max_iters
        self.rank, self.world_size = rank, world_size
        self.group_ids = None if group_ids is None else self._merge_small_groups(torch.as_tensor(group_ids))
        self._epoch, self._batches = -1, torch.empty(0)

    def _merge_small_groups(self, group_ids: torch.Tensor) -> torch.Tensor:
        """Group ids with every group smaller than one global batch merged into the largest group."""
        if group_ids.numel() != self.size:
            raise ValueError(f"group_ids has {group_ids.numel()} entries for a dataset of {self.size} images")
        gb = self.batch_size * self.world_size
        groups, counts = torch.unique(group_ids, return_counts=True)
        sizes = dict(zip(groups.tolist(), counts.tolist()))
        target = max(sizes, key=lambda g: (sizes[g], -g))  # the largest group, the lowest id on a tie
        small = sorted(g for g, n in sizes.items() if n < gb and g != target)
        if small:
            log.warning("aspect-ratio grouping: group%s %s (%s images) smaller than one global batch of %d: "
                        "they share the batches of group %s (%d images), so batches mixing them pad more",
                        "s" if len(small) > 1 else "", ", ".join(map(str, small)),
                        ", ".join(str(sizes[g]) for g in small), gb, target, sizes[target])
            group_ids = group_ids.clone()
            for g in small:
                group_ids[group_ids == g] = target
        merged = {g: n for g, n in sizes.items() if g not in small}
        merged[target] += sum(sizes[g] for g in small)
        full = sum(n // gb for n in merged.values())
        log.info("aspect-ratio grouping: groups %s; per epoch %d batches of %d, %d of them a group's partial last "
                 "batch filled with its own images (as torchvision's GroupedBatchSampler)",
                 merged, self.size // gb, gb, self.size // gb - full)
        return group_ids

    def _epoch_batches(self, epoch: int) -> torch.Tensor:
        """Global batches of one epoch, ``(num_batches, batch_size * world_size)``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.size, generator=g)
        gb = self.batch_size * self.world_size
        if self.group_ids is None:
            n = self.size // gb
            return perm[: n * gb].view(n, gb)
        chunks, partial = [], []
        for group in torch.unique(self.group_ids):
            members = perm[self.group_ids[perm] == group]
            n = members.numel() // gb
            chunks.append(members[: n * gb].view(n, gb))
            if members.numel() > n * gb:
                partial.append((members[n * gb :], members))
        # torchvision's GroupedBatchSampler: the epoch has as many batches as without groups; the missing
        # ones are the groups' partial last batches, the fullest first, each filled with its group's first images.
        missing = self.size // gb - sum(c.shape[0] for c in chunks)
        order = torch.randperm(len(partial), generator=g).tolist()  # fair among equally full ones
        order.sort(key=lambda i: -partial[i][0].numel())
        for i in order[:missing]:
            rest, members = partial[i]
            fill = members.repeat(-(-gb // members.numel()))[: gb - rest.numel()]
            chunks.append(torch.cat([rest, fill]).view(1, gb))
        batches = torch.cat(chunks)
        return batches[torch.randperm(batches.shape[0], generator=g)]

    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's items for ``iteration``."""
        per_epoch = self.batches_per_epoch() if self._epoch < 0 else self._batches.shape[0]
        epoch, k = divmod(iteration, per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        row = self._batches[k, self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        base = (self.seed * 1_000_003 + iteration) * self.batch_size * self.world_size
        offset = self.rank * self.batch_size
        return [(int(idx), base + offset + j) for j, idx in enumerate(row.tolist())]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        i = self.start_iter
        while self.max_iters is None or i < self.max_iters:
            yield self.batch(i)
            i += 1

    def __len__(self) -> int:
        if self.max_iters is None:
            raise TypeError("infinite sampler has no length")
        return max(self.max_iters - self.start_iter, 0)
