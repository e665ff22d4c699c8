"""What a build (or its dry run) did, and its summary for the terminal."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BuildResult:
    dataset: str
    plan: dict[str, Any]
    pairs: int = 0  # pairs in the dataset (all shards, this run's and earlier ones)
    built_shards: int = 0  # shards written by this run
    skipped_shards: int = 0  # shards already committed
    rejects: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    output_bytes: int = 0  # shard bytes of the dataset
    pairs_per_second: float = 0.0  # this run's pairs / wall time of the worker pool (Ray start-up included)
    # From the first shard started to the last one finished, on the workers' clocks: the pool's wall time without Ray
    # start-up and model loading (benchmarks divide by it; one host's clock, or synchronised nodes).
    busy_seconds: float = 0.0
    delta_e_mean: float | None = None
    estimated_bytes: int | None = None  # dry run only
    actors: int | None = None  # dry run only
    checkpoint_plan: str | None = None  # dry run only: the checkpoint used, or that it is trained first
    refusal: str | None = None  # dry run only: why the real run would be refused (a different build's shard)
    # A resume onto a labelled dataset: whether this run's pairs are labelled too (None: no such resume).
    labels_note: str | None = None

    def summary_lines(self) -> list[str]:
        if self.estimated_bytes is not None:
            plan = self.plan
            return [
                f"dry run: dataset {self.dataset}",
                f"  sources {plan['sources']}, usable images {plan['images']}, rejected {len(self.rejects)}",
                f"  crops {plan['crops']} of {plan['crop']}x{plan['crop']} (grid, stride {plan['stride']}), "
                f"shards {plan['shards']}, actors {self.actors}",
                f"  checkpoint {self.checkpoint_plan}",
                f"  estimated output {self.estimated_bytes / 1e6:,.1f} MB",
                *([f"  the real run would be refused: {self.refusal}"] if self.refusal else []),
            ]
        reasons = Counter(row["reason"] for row in self.rejects)
        rejected = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())) or "none"
        delta = "n/a" if self.delta_e_mean is None else f"{self.delta_e_mean:.3f}"
        return [
            f"dataset {self.dataset}: {self.pairs} pairs in {self.built_shards + self.skipped_shards} shards "
            f"({self.built_shards} built, {self.skipped_shards} already committed)",
            f"  rejected inputs: {len(self.rejects)} ({rejected})",
            f"  {self.seconds:.1f} s, {self.pairs_per_second:.2f} pairs/s, {self.output_bytes / 1e6:.1f} MB of shards, "
            f"mean delta_e {delta}",
            *([f"  {self.labels_note}"] if self.labels_note else []),
        ]
