"""Running shard tasks: on a pool of worker actors (Ray, the one place the build calls it), or in this process.

`ActorPool` is the scheduler, free of Ray: a shard goes only to an actor that is up (its worker was built, so its
model is loaded) and idle; each actor holds one shard at a time (a shard is large enough to keep a device busy). An
actor that dies (its process or node is gone) is killed for good, its shard goes back to the front of the queue for
the actors that are up, and a replacement is requested; if the cluster cannot host the replacement (its node is gone
for good) the build carries on with the actors it has. A shard that fails `max_attempts` times, a pool with no actor
up for `actor_timeout` seconds, or a FactoryError in a worker (a bad option, a full disk: no retry can help) stops
the build with the error. `RayActors` is what the pool asks of Ray: start an actor, give it a shard, wait, collect.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from factory.build.config import BuildConfig
from factory.build.plan import ShardTask
from factory.build.worker import ShardSummary, ShardWorker, WorkerSettings
from factory.config import FactoryError

log = logging.getLogger(__name__)

OnDone = Callable[[ShardTask, ShardSummary], None]  # called as each shard commits


class ActorLost(Exception):
    """The actor's process or node is gone (its shard is given to another actor)."""


class TaskFailed(Exception):
    """The task raised an error that is not a FactoryError: worth another try."""


class Actors(Protocol):
    """What ActorPool asks of a cluster. References are hashable handles of results to come."""

    def launch(self) -> tuple[Any, Any]:
        """Start an actor: (actor, reference of its start, ready when its worker is built)."""
        ...

    def submit(self, actor: Any, task: ShardTask) -> Any:
        """Give `task` to `actor`: the reference of its ShardSummary."""
        ...

    def wait(self, references: list[Any], timeout: float) -> list[Any]:
        """Some of `references` that are ready, waiting at most `timeout` seconds ([] if none is)."""
        ...

    def result(self, reference: Any) -> Any:
        """The value of a ready reference; raises ActorLost, TaskFailed, or the worker's FactoryError."""
        ...

    def kill(self, actor: Any) -> None: ...


@dataclass(frozen=True)
class PoolLimits:
    max_attempts: int  # tries per shard; an actor start may fail max_attempts times per actor asked for
    actor_timeout: float  # seconds without any actor up before the build gives up
    actor_resources: str  # what each actor takes, for the timeout's message ("1 GPU")


class ActorPool:
    """Shards on a pool of actors: `start` asks for the actors, `run` assigns shards as actors come up or finish
    (`assign`, `on_ready`, `on_death`) until every shard is committed, then `close` kills the actors."""

    def __init__(
        self,
        actors: Actors,
        tasks: list[ShardTask],
        on_done: OnDone,
        limits: PoolLimits,
        clock=time.monotonic,
    ):
        self.actors, self.on_done, self.limits, self.clock = actors, on_done, limits, clock
        self.queue: deque[ShardTask] = deque(tasks)
        self.idle: deque[Any] = deque()  # actors that are up and hold no shard
        self.starting: dict[Any, Any] = {}  # start reference -> actor not yet up
        self.in_flight: dict[Any, tuple[Any, ShardTask]] = {}  # shard reference -> (actor, task)
        self.attempts: Counter[int] = Counter()  # shard index -> tries so far
        self.start_failures: list[str] = []
        self.wanted = 0  # actors asked for
        self.last_up = clock()  # when an actor was last seen up (for actor_timeout)

    def start(self, count: int) -> None:
        self.wanted = count
        for _ in range(count):
            self._launch()

    def _launch(self) -> None:
        actor, reference = self.actors.launch()
        self.starting[reference] = actor

    def assign(self) -> None:
        """Give queued shards to idle actors; give up when no actor has been up for `actor_timeout` seconds."""
        while self.idle and self.queue:
            actor, task = self.idle.popleft(), self.queue.popleft()
            self.attempts[task.index] += 1
            self.in_flight[self.actors.submit(actor, task)] = (actor, task)
        if self.idle or self.in_flight:
            self.last_up = self.clock()
        elif self.clock() - self.last_up > self.limits.actor_timeout:
            detail = f"; last error: {self.start_failures[-1]}" if self.start_failures else ""
            raise FactoryError(
                f"no worker actor could start within {self.limits.actor_timeout:.0f} s "
                f"({self.limits.actor_resources} each){detail}"
            )

    def on_ready(self, reference: Any) -> None:
        """An actor came up (or failed to), or a shard finished (or failed)."""
        if reference in self.starting:
            self._on_started(self.starting.pop(reference), reference)
        else:
            self._on_finished(*self.in_flight.pop(reference), reference)

    def _on_started(self, actor: Any, reference: Any) -> None:
        try:
            self.actors.result(reference)
        except (ActorLost, TaskFailed) as error:
            self.start_failures.append(str(error))
            log.warning("a worker actor failed to start: %s", error)
            self.actors.kill(actor)
            if len(self.start_failures) >= self.limits.max_attempts * max(1, self.wanted):
                raise FactoryError(f"worker actors keep failing to start: {error}") from None
            self._launch()
            return
        except FactoryError:  # the worker's own one-line error (a bad checkpoint, a missing device)
            self.actors.kill(actor)
            raise
        self.idle.append(actor)

    def _on_finished(self, actor: Any, task: ShardTask, reference: Any) -> None:
        try:
            summary = self.actors.result(reference)
        except ActorLost as error:
            self.on_death(actor, task, error)
            return
        except TaskFailed as error:
            log.warning("shard %s failed (%s); retrying", task.stem, error)
            self.idle.append(actor)
            self._requeue(task, error)
            return
        except FactoryError as error:
            self.actors.kill(actor)
            raise FactoryError(f"shard {task.stem}: {error}") from None
        self.idle.append(actor)
        self.on_done(task, summary)

    def on_death(self, actor: Any, task: ShardTask, error: ActorLost) -> None:
        """`actor` died holding `task`: kill it for good, ask for a replacement, put the shard back in front."""
        log.warning("actor died on shard %s (%s); retrying it", task.stem, error)
        self.actors.kill(actor)
        self._launch()
        self._requeue(task, error)

    def _requeue(self, task: ShardTask, error: Exception) -> None:
        if self.attempts[task.index] >= self.limits.max_attempts:
            raise FactoryError(
                f"shard {task.stem} failed {self.attempts[task.index]} times; last error: {error}"
            )
        self.queue.appendleft(task)

    def run(self, poll_seconds: float = 1.0) -> None:
        """Until every shard is committed (or an error stops the build); the actors are killed in the end."""
        try:
            while self.queue or self.in_flight:
                self.assign()
                for reference in self.actors.wait([*self.in_flight, *self.starting], poll_seconds):
                    self.on_ready(reference)
        finally:
            self.close()

    def close(self) -> None:
        for actor in [*self.idle, *self.starting.values(), *(actor for actor, _ in self.in_flight.values())]:
            self.actors.kill(actor)
        self.idle.clear()
        self.starting.clear()
        self.in_flight.clear()


# --------------------------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------------------------


class WorkerHost:
    """The Ray actor around a worker. The worker is built in `start`, a task, rather than in the actor's
    constructor: an error there then reaches the driver as the task's error, of its own type, where a constructor's
    arrives as an actor death whose cause is only text."""

    def __init__(self, worker_class: type[ShardWorker], settings: WorkerSettings):
        self.worker_class, self.settings = worker_class, settings
        self.worker: ShardWorker | None = None

    def start(self) -> bool:
        self.worker = self.worker_class(self.settings)
        return True

    def build_shard(self, task: ShardTask) -> ShardSummary:
        return self.worker.build_shard(task)


class RayActors:
    """`Actors` on a Ray cluster: WorkerHost actors of `options` (CPUs, GPUs, no restarts)."""

    def __init__(
        self, ray, options: dict[str, Any], worker_class: type[ShardWorker], settings: WorkerSettings
    ):
        self.ray = ray
        self.remote_host = ray.remote(WorkerHost).options(**options)
        self.worker_class, self.settings = worker_class, settings

    def launch(self) -> tuple[Any, Any]:
        actor = self.remote_host.remote(self.worker_class, self.settings)
        return actor, actor.start.remote()

    def submit(self, actor: Any, task: ShardTask) -> Any:
        return actor.build_shard.remote(task)

    def wait(self, references: list[Any], timeout: float) -> list[Any]:
        ready, _ = self.ray.wait(references, num_returns=1, timeout=timeout)
        return ready

    def result(self, reference: Any) -> Any:
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return self.ray.get(reference)
        except RayActorError as error:
            raise ActorLost(_actor_error_message(error)) from None
        except RayTaskError as error:
            if isinstance(error.cause, FactoryError):
                raise error.cause from None
            raise TaskFailed(_last_line(error.cause)) from None

    def kill(self, actor: Any) -> None:
        self.ray.kill(actor, no_restart=True)


# Ray 2.60 turns token authentication on for every new local cluster (RAY_AUTH_MODE unset) and then says so with a
# warning on every start (ray/_private/authentication/authentication_token_setup.py, _warn_token_auth_enabled). The
# embedded cluster keeps Ray's default, token authentication, and drops that one notice. Setting RAY_AUTH_MODE=token
# (Ray's own way to silence it) is not enough from inside a process that has imported ray: Ray caches its config at
# import, so the driver would stay "disabled" while the GCS it starts demands a token, and the build fails.
RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
RAY_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


class _WithoutTokenNotice(logging.Filter):
    """Drops Ray's "Token authentication is enabled" notice and lets every other record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(RAY_TOKEN_NOTICE)


def _quiet_token_notice() -> None:
    token_logger = logging.getLogger(RAY_TOKEN_LOGGER)
    if not any(isinstance(item, _WithoutTokenNotice) for item in token_logger.filters):
        token_logger.addFilter(_WithoutTokenNotice())


def connect_ray(address: str | None, num_cpus: int | None = None):
    """Connect to the Ray cluster at `address` ("auto", "ray://host:10001", "host:6379"), or start an embedded local
    Ray with `num_cpus` CPUs (None: all) when it is None; returns (ray module, whether we started it). A process
    that runs inside Ray already (a Ray task) keeps its cluster. The build and `factory study` share this."""
    import ray

    if ray.is_initialized():
        return ray, False
    runtime_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
        else:
            _quiet_token_notice()
            # address="local": always a new embedded cluster. Plain ray.init() would silently join any cluster
            # this machine has running (`ray start`, another build's test cluster), with its resources and fate.
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=True,
                runtime_env=runtime_env,
            )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise FactoryError(f"cannot start or reach Ray ({address or 'local'}): {error}") from None
    return ray, True


def run_on_ray(
    config: BuildConfig,
    settings: WorkerSettings,
    tasks: list[ShardTask],
    on_done: OnDone,
    worker_class: type[ShardWorker] = ShardWorker,
) -> None:
    """Run `tasks` on an ActorPool of `worker_class` actors sized to the cluster, with a progress bar."""
    from tqdm import tqdm

    ray, started_here = connect_ray(config.address, config.num_cpus)
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        use_gpus = gpus > 0 and settings.device != "cpu"
        # CPU-only: one single-threaded actor per CPU. Measured here: with other work on the cores, two torch threads
        # in one actor ran 4x slower than one (OpenMP threads spin while they wait for each other).
        count = config.actors or (gpus if use_gpus else cpus)
        if not use_gpus and count > cpus:
            log.warning("--actors %d is more than the cluster's %d CPUs; using %d", count, cpus, cpus)
            count = cpus
        count = min(count, len(tasks))
        threads = settings.threads or (None if config.address else max(1, cpus // count))
        settings = WorkerSettings(**{**asdict(settings), "threads": threads})
        options = {"num_cpus": 1, "num_gpus": 1 if use_gpus else 0, "max_restarts": 0, "max_task_retries": 0}
        limits = PoolLimits(config.max_attempts, config.actor_timeout, "1 GPU" if use_gpus else "1 CPU")
        log.info("starting %d %s actor(s)", count, "GPU" if use_gpus else "CPU")
        total = sum(len(task.crops) for task in tasks)
        with tqdm(total=total, unit="pair", disable=not config.progress, dynamic_ncols=True) as bar:
            done = Counter[str]()

            def on_shard(task: ShardTask, summary: ShardSummary) -> None:
                done["shards"] += 1
                bar.update(len(task.crops))  # planned crops done (a rejected source's included)
                bar.set_postfix_str(f"shards {done['shards']}/{len(tasks)}")
                on_done(task, summary)

            bar.set_postfix_str(f"shards 0/{len(tasks)}")
            pool = ActorPool(RayActors(ray, options, worker_class, settings), tasks, on_shard, limits)
            pool.start(count)
            pool.run()
    finally:
        if started_here:
            ray.shutdown()


def run_in_process(
    config: BuildConfig,
    settings: WorkerSettings,
    tasks: list[ShardTask],
    on_done: OnDone,
    worker_class: type[ShardWorker] = ShardWorker,
) -> None:
    """`--actors 0`: one worker in this process, no Ray (debugging, tiny builds, tests of what follows)."""
    from tqdm import tqdm

    worker = worker_class(settings)
    with tqdm(total=sum(len(task.crops) for task in tasks), unit="pair", disable=not config.progress) as bar:
        for task in tasks:
            on_done(task, worker.build_shard(task))
            bar.update(len(task.crops))


def _actor_error_message(error: BaseException) -> str:
    """The useful line of a Ray actor error: the last line naming an error, else the first."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0]:
            return line
    return lines[0] if lines else type(error).__name__


def _last_line(error: BaseException) -> str:
    """A task error's message ends with the exception the task raised: its last line says what went wrong."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__
