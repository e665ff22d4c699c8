"""The build's scheduler (factory.build.pool.ActorPool) against fake actors, without Ray: every shard committed
exactly once through actor deaths, task failures and failed starts; the limits that stop a build."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from factory.build.plan import ShardTask
from factory.build.pool import ActorLost, ActorPool, PoolLimits, TaskFailed
from factory.build.worker import ShardSummary
from factory.config import FactoryError

LIMITS = PoolLimits(max_attempts=3, actor_timeout=30.0, actor_resources="1 CPU")


class FakeActors:
    """Actors whose starts and shards finish in the order they were asked for, with scripted failures: each
    failure list is consumed one entry per attempt (an exception to raise, or None for a success)."""

    def __init__(self, start_faults: list | None = None, shard_faults: dict[str, list] | None = None):
        self.start_faults = list(start_faults or [])
        self.shard_faults = {stem: list(faults) for stem, faults in (shard_faults or {}).items()}
        self.ready: deque = deque()  # references in the order they become ready
        self.values: dict[Any, Any] = {}
        self.launched: list[str] = []
        self.submitted: list[tuple[str, str]] = []  # (actor, shard stem)
        self.killed: list[str] = []
        self.now = 0.0  # the pool's clock: each empty wait advances it

    def launch(self) -> tuple[str, tuple]:
        actor = f"actor-{len(self.launched)}"
        self.launched.append(actor)
        reference = ("start", actor)
        fault = self.start_faults.pop(0) if self.start_faults else None
        if fault != "never":  # "never": the cluster cannot host it, so it never comes up
            self.values[reference] = fault or True
            self.ready.append(reference)
        return actor, reference

    def submit(self, actor: str, task: ShardTask) -> tuple:
        assert actor not in self.killed
        reference = ("shard", actor, task.stem, len(self.submitted))
        self.submitted.append((actor, task.stem))
        faults = self.shard_faults.get(task.stem, [])
        fault = faults.pop(0) if faults else None
        self.values[reference] = fault or summary(task)
        self.ready.append(reference)
        return reference

    def wait(self, references: list, timeout: float) -> list:
        for reference in list(self.ready):
            if reference in references:
                self.ready.remove(reference)
                return [reference]
        self.now += timeout
        return []

    def result(self, reference: Any) -> Any:
        value = self.values.pop(reference)
        if isinstance(value, BaseException):
            raise value
        return value

    def kill(self, actor: str) -> None:
        self.killed.append(actor)


def summary(task: ShardTask) -> ShardSummary:
    return ShardSummary(task.index, task.stem, 4, [], 1000, 0.1, 0.0, 0.0)


def tasks(count: int) -> list[ShardTask]:
    return [ShardTask(index, f"d-{index:06d}", (), ()) for index in range(count)]


def run_pool(actors: FakeActors, shard_count: int, actor_count: int) -> list[str]:
    """Run the pool; the stems in the order they were committed."""
    done: list[str] = []
    pool = ActorPool(
        actors, tasks(shard_count), lambda task, _: done.append(task.stem), LIMITS, lambda: actors.now
    )
    pool.start(actor_count)
    pool.run(poll_seconds=1.0)
    return done


def test_every_shard_commits_once_and_every_actor_is_killed_at_the_end():
    actors = FakeActors()
    done = run_pool(actors, shard_count=5, actor_count=2)
    assert sorted(done) == [task.stem for task in tasks(5)]
    assert len(actors.submitted) == 5
    assert {actor for actor, _ in actors.submitted} == {"actor-0", "actor-1"}  # both took shards
    assert sorted(actors.killed) == ["actor-0", "actor-1"]


def test_a_dead_actor_is_replaced_and_its_shard_redone_exactly_once():
    actors = FakeActors(shard_faults={"d-000001": [ActorLost("node gone")]})
    done = run_pool(actors, shard_count=4, actor_count=2)
    assert sorted(done) == [task.stem for task in tasks(4)]  # each committed once
    assert [stem for _, stem in actors.submitted].count("d-000001") == 2
    assert actors.launched == ["actor-0", "actor-1", "actor-2"]  # one replacement
    dead = next(actor for actor, stem in actors.submitted if stem == "d-000001")
    assert actors.killed[0] == dead  # killed for good when it died, before the end
    assert not any(
        actor == dead for actor, _ in actors.submitted[actors.submitted.index((dead, "d-000001")) + 1 :]
    )


def test_a_failing_shard_is_retried_up_to_max_attempts_then_stops_the_build():
    actors = FakeActors(shard_faults={"d-000000": [TaskFailed("ValueError: bad")] * 3})
    with pytest.raises(FactoryError, match=r"^shard d-000000 failed 3 times; last error: ValueError: bad$"):
        run_pool(actors, shard_count=2, actor_count=1)
    assert actors.killed == ["actor-0"]  # close() ran


def test_a_shard_retried_after_a_task_failure_commits():
    actors = FakeActors(shard_faults={"d-000000": [TaskFailed("OSError: flaky")]})
    assert sorted(run_pool(actors, shard_count=2, actor_count=1)) == ["d-000000", "d-000001"]
    assert actors.launched == ["actor-0"]  # a task failure keeps the actor


def test_a_factory_error_in_a_shard_stops_the_build_at_once_without_retry():
    actors = FakeActors(
        shard_faults={"d-000001": [FactoryError("cannot write x.tar: No space left on device")]}
    )
    with pytest.raises(FactoryError, match=r"^shard d-000001: cannot write x.tar: No space left on device$"):
        run_pool(actors, shard_count=3, actor_count=1)
    assert [stem for _, stem in actors.submitted].count("d-000001") == 1


def test_a_factory_error_in_a_worker_start_is_raised_as_it_is():
    actors = FakeActors(start_faults=[FactoryError("checkpoint x.pt is not a vqvae2 checkpoint")])
    with pytest.raises(FactoryError, match=r"^checkpoint x.pt is not a vqvae2 checkpoint$"):
        run_pool(actors, shard_count=2, actor_count=1)
    assert actors.killed == ["actor-0"]


def test_failed_starts_are_replaced_until_max_attempts_per_actor():
    actors = FakeActors(start_faults=[TaskFailed("RuntimeError: no CUDA")] * 2)
    assert sorted(run_pool(actors, shard_count=2, actor_count=1)) == ["d-000000", "d-000001"]
    assert len(actors.launched) == 3
    actors = FakeActors(start_faults=[TaskFailed("RuntimeError: no CUDA")] * 6)
    with pytest.raises(FactoryError, match=r"^worker actors keep failing to start: RuntimeError: no CUDA$"):
        run_pool(actors, shard_count=2, actor_count=2)
    # The sixth failure (3 for each of the 2 actors asked for) stops it: 2 actors, and a replacement for each of the
    # first 5 failures.
    assert len(actors.launched) == 7


def test_no_actor_up_for_actor_timeout_stops_the_build():
    actors = FakeActors(start_faults=["never"])
    with pytest.raises(FactoryError, match=r"^no worker actor could start within 30 s \(1 CPU each\)$"):
        run_pool(actors, shard_count=1, actor_count=1)
    assert actors.now > LIMITS.actor_timeout
    assert actors.killed == ["actor-0"]  # the one still starting
