"""The build: HR crops -> (degraded LR, HR) pairs in WebDataset shards with Parquet manifests, on Ray actors.

config   BuildConfig: the options, checked in one place; the dataset's name and crop side
plan     which crops of which HR files go into which shard, with their keys (deterministic)
identity the settings that make two builds the same build, their digest, and the resume check
worker   ShardWorker: whole shards -> a tar and its manifest (a Ray actor, or in this process)
pool     ActorPool: shards on worker actors (the one place that calls Ray), or in this process
card     the dataset card
driver   build(): the orchestration
"""

from factory.build.config import BuildConfig
from factory.build.driver import build
from factory.build.result import BuildResult

__all__ = ["BuildConfig", "BuildResult", "build"]
