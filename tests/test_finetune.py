"""SR networks and fine-tuning: official key layouts, EDSR/ESRGAN/SwinIR/HAT through one loading path, learning on
bicubic pairs, checkpoint resume, and DDP under torchrun (gloo, 2 processes)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sr_pairs import bicubic_lr, crops, write_pairs

from factory.cli import main
from factory.config import FactoryError
from factory.finetune import FinetuneConfig, FinetuneResult, finetune
from factory.sr.edsr import EDSR, EDSRConfig, load_edsr
from factory.sr.networks import build_network, load_network, read_state_dict, save_weights

# The parameter names of the official EDSR-baseline x4 checkpoint (EDSR-PyTorch, edsr_baseline_x4-6b446fab.pt), with
# 16 residual blocks abbreviated to the first and the conv after them: our module must produce exactly this layout.
OFFICIAL_EDSR_BASELINE_KEYS = [
    "sub_mean.weight",
    "sub_mean.bias",
    "add_mean.weight",
    "add_mean.bias",
    "head.0.weight",
    "head.0.bias",
    "body.0.body.0.weight",
    "body.0.body.0.bias",
    "body.0.body.2.weight",
    "body.0.body.2.bias",
    "body.16.weight",
    "body.16.bias",
    "tail.0.0.weight",
    "tail.0.0.bias",
    "tail.0.2.weight",
    "tail.0.2.bias",
    "tail.1.weight",
    "tail.1.bias",
]


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("pairs")
    training = {name: photo for name, photo in photos.items() if name not in ("astronaut", "coffee")}
    write_pairs(root / "shards", root / "manifests", crops(training, size=96, per_photo=4), per_shard=4)
    return root / "shards" / "bicubic", root / "manifests"


@pytest.fixture(scope="module")
def held_out(photos):
    """Held-out bicubic pairs from photos the training never sees: (LR (N, 3, 24, 24), HR (N, 3, 96, 96))."""
    pairs = crops({"astronaut": photos["astronaut"], "coffee": photos["coffee"]}, size=96, per_photo=3)
    hr = np.stack([image for _, image in pairs])
    lr = np.stack([bicubic_lr(image, 4) for _, image in pairs])
    as_tensor = lambda array: torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    return as_tensor(lr), as_tensor(hr)


def _config(shards, out, **changes) -> FinetuneConfig:
    values = dict(
        architecture="edsr",
        preset="tiny",
        shards=(str(shards),),
        iterations=4,
        batch_size=4,
        patch_size=16,
        learning_rate=1e-3,
        patches_per_pair=4,
        workers=0,
        checkpoint_every=2,
        log_every=2,
        out=str(out),
    )
    values.update(changes)
    return FinetuneConfig(**values)


def test_edsr_has_the_official_key_layout():
    baseline = EDSR(EDSRConfig(scale=4, features=64, residual_blocks=16))
    keys = list(baseline.state_dict())
    assert set(OFFICIAL_EDSR_BASELINE_KEYS) <= set(keys)
    assert (
        len(keys) == 4 + 2 + 4 * 16 + 2 + 6
    )  # mean shifts, head, 16 blocks of 2 convs, body conv, tail (78)
    # The official MeanShift: identity 1x1 conv with bias -255 * DIV2K mean (EDSR-PyTorch common.MeanShift).
    assert torch.allclose(baseline.sub_mean.bias, -255 * torch.tensor([0.4488, 0.4371, 0.4040]))


def test_basicsr_edsr_weights_load_into_the_same_network():
    official = EDSR(EDSRConfig(scale=4, features=16, residual_blocks=2))
    state = official.state_dict()
    # The same weights under BasicSR's EDSR names (basicsr/archs/edsr_arch.py), which keeps the mean as a constant.
    renames = {
        "head.0": "conv_first",
        "body.2": "conv_after_body",
        "tail.0.0": "upsample.0",
        "tail.0.2": "upsample.2",
        "tail.1": "conv_last",
    }
    basicsr = {}
    for key, value in state.items():
        if key.startswith(("sub_mean", "add_mean")):
            continue
        prefix, kind = key.rsplit(".", 1)
        prefix = renames.get(prefix, prefix).replace(".body.0", ".conv1").replace(".body.2", ".conv2")
        basicsr[f"{prefix}.{kind}"] = value
    loaded = load_edsr(basicsr)
    x = torch.rand(1, 3, 12, 12)
    assert torch.equal(loaded(x), official(x))


@pytest.mark.parametrize("architecture", ["esrgan", "swinir", "hat"])
def test_spandrel_architectures_load_train_a_step_and_save(tmp_path, train_shards, architecture):
    # Weights in the official key layout, saved by spandrel's own architecture classes, as a user's download would be.
    pretrained = tmp_path / f"{architecture}.pth"
    network = build_network(architecture, "tiny")
    torch.save({"params_ema": network.module.state_dict()}, pretrained)  # BasicSR's wrapper
    before = read_state_dict(pretrained)
    result = finetune(
        _config(
            train_shards[0],
            tmp_path / "run",
            architecture=architecture,
            pretrained=str(pretrained),
            iterations=1,
        )
    )
    assert result.iterations == 1 and np.isfinite(result.final_loss)
    after = load_network(result.weights, architecture)
    saved = read_state_dict(result.weights)
    assert list(saved) == list(before)  # the same (official) layout, key for key
    assert any(not torch.equal(saved[key], before[key]) for key in before if before[key].is_floating_point())
    assert after.module(torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = save_weights(build_network("edsr", "tiny"), tmp_path / "edsr.pth")
    with pytest.raises(FactoryError, match="--arch hat but the weights are edsr"):
        load_network(path, "hat")


def _held_out_l1(weights, held_out) -> float:
    network = load_network(weights).module.eval()
    lr, hr = held_out
    with torch.no_grad():
        return (network(lr).clamp(0, 1) - hr).abs().mean().item()


def test_fine_tuning_on_bicubic_pairs_lowers_held_out_l1_and_resumes(tmp_path, train_shards, held_out):
    torch.manual_seed(0)
    initial = save_weights(build_network("edsr", "tiny"), tmp_path / "initial.pth")
    result = finetune(
        _config(
            train_shards[0],
            tmp_path / "run",
            pretrained=str(initial),
            iterations=60,
            batch_size=8,
            checkpoint_every=30,
            log_every=10,
        )
    )
    before, after = _held_out_l1(initial, held_out), _held_out_l1(result.weights, held_out)
    assert after < 0.7 * before, (before, after)
    assert sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "iter_0000030.pt",
        "iter_0000060.pt",
    ]
    # Resume: 60 more steps asked for 70 in all; the run starts from the newest checkpoint, not from scratch.
    resumed = finetune(
        _config(train_shards[0], tmp_path / "run", pretrained=str(initial), iterations=70, log_every=10)
    )
    assert resumed.iterations == 70 and [line["iteration"] for line in resumed.history] == [70]
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [10, 20, 30, 40, 50, 60, 70]
    assert all(line["patches_per_second"] > 0 for line in lines)
    # An intermediate training checkpoint loads wherever weights do (factory eval --model runs/.../iter_*.pt).
    intermediate = load_network(tmp_path / "run" / "checkpoints" / "iter_0000030.pt").module.eval()
    with torch.no_grad():
        assert intermediate(held_out[0]).shape == held_out[1].shape


def test_an_unreadable_checkpoint_to_resume_from_is_a_one_line_error(tmp_path, train_shards):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "iter_0000002.pt").write_bytes(b"")  # e.g. a full disk, copied over
    with pytest.raises(FactoryError, match=r"cannot read checkpoint .*iter_0000002.pt: EOFError"):
        finetune(_config(train_shards[0], tmp_path / "run"))


def test_where_and_manifests_reach_the_stream(tmp_path, train_shards):
    shards, manifests = train_shards
    result = finetune(
        _config(
            shards, tmp_path / "run", manifests=str(manifests), where="label = 'defocus_blur'", iterations=2
        )
    )
    assert result.iterations == 2
    with pytest.raises(FactoryError, match="select no pair"):
        finetune(
            _config(shards, tmp_path / "none", manifests=str(manifests), where="delta_e > 1e9", iterations=2)
        )


def _console_script(name: str) -> str | None:
    """The installed script beside this interpreter (a pyenv shim found first on PATH is a shell script, which
    torchrun would try to run with Python)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


@pytest.mark.skipif(
    _console_script("torchrun") is None or _console_script("factory") is None,
    reason="needs torchrun and the factory script",
)
def test_tiny_edsr_under_torchrun_with_two_processes(tmp_path, train_shards):
    out = tmp_path / "ddp"
    command = [
        _console_script("torchrun"),
        "--standalone",
        "--nproc-per-node=2",
        _console_script("factory"),
        "finetune",
        "--arch",
        "edsr",
        "--preset",
        "tiny",
        "--shards",
        str(train_shards[0]),
        "--iters",
        "6",
        "--batch-size",
        "4",
        "--patch-size",
        "16",
        "--workers",
        "1",
        "--log-every",
        "3",
        "--checkpoint-every",
        "3",
        "--out",
        str(out),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("6 iterations") == 1  # one result line, from rank 0
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [3, 6]
    assert load_network(out / "model.pth", "edsr").scale == 4


def test_vgg_features_match_torchvision(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    from factory.sr.losses import VGGFeatures, vgg19_conv_indices

    assert vgg19_conv_indices()["conv5_4"] == 34  # ESRGAN's layer: torchvision vgg19().features[34]
    # Reference: torchvision's own VGG19 feature stack ("E"), saved under its `features.` names.
    reference = make_layers(cfgs["E"]).eval()
    keep = {
        f"features.{key}": value
        for key, value in reference.state_dict().items()
        if int(key.split(".")[0]) <= 7
    }
    torch.save(keep, tmp_path / "vgg19.pth")
    ours = VGGFeatures.from_file(tmp_path / "vgg19.pth", "conv2_2")
    x = torch.rand(2, 3, 32, 32)
    normalised = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(ours(x), reference[:8](normalised), atol=1e-6)
    with pytest.raises(FactoryError, match="not a VGG19"):
        VGGFeatures.from_file(tmp_path / "vgg19.pth", "conv3_1")


def test_esrgan_loss_trains_generator_and_discriminator_and_resumes(tmp_path, train_shards):
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["E"]).state_dict()
    torch.save(
        {f"features.{key}": value for key, value in features.items() if int(key.split(".")[0]) <= 7},
        tmp_path / "vgg.pth",
    )
    config = _config(
        train_shards[0],
        tmp_path / "gan",
        architecture="esrgan",
        loss="esrgan",
        vgg_weights=str(tmp_path / "vgg.pth"),
        perceptual_layer="conv2_2",
        iterations=2,
        log_every=1,
        checkpoint_every=2,
        patch_size=8,
    )
    result = finetune(config)
    assert set(result.history[-1]) >= {"loss", "l1", "perceptual", "gan", "discriminator"}
    checkpoint = torch.load(tmp_path / "gan" / "checkpoints" / "iter_0000002.pt", weights_only=True)
    assert "discriminator" in checkpoint and "discriminator_optimizer" in checkpoint
    resumed = finetune(dataclasses.replace(config, iterations=3))
    assert resumed.iterations == 3 and [line["iteration"] for line in resumed.history] == [3]
    with pytest.raises(FactoryError, match="--vgg-weights"):
        finetune(dataclasses.replace(config, vgg_weights=None))


@pytest.mark.slow  # builds the four full-size networks: ~20 s on two busy cores
@pytest.mark.parametrize(
    ("architecture", "published_millions"),
    # Parameter counts the papers publish for their x4 models: EDSR 43M (Lim et al. 2017), ESRGAN's RRDBNet 16.7M
    # (Wang et al. 2018), SwinIR classical SR 11.9M (Liang et al. 2021), HAT 20.8M (Chen et al. 2023).
    [("edsr", 43.1), ("esrgan", 16.7), ("swinir", 11.9), ("hat", 20.8)],
)
def test_paper_presets_have_the_published_sizes(architecture, published_millions):
    network = build_network(architecture, "paper")
    millions = (
        sum(parameter.numel() for parameter in network.module.parameters() if parameter.requires_grad) / 1e6
    )
    assert millions == pytest.approx(published_millions, abs=0.15)
    assert network.scale == 4


# --- one trainer per output folder ----------------------------------------------------------------------------------


def _running(pid: int) -> bool:
    """Whether process `pid` still runs: os.kill(pid, 0) succeeds on a zombie too (an orphan waits for PID 1 to reap
    it, which a container's init may never do), so a zombie counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_second_trainer_on_the_same_out_is_refused_with_the_holders_pid(tmp_path, train_shards):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "_finetune.lock").write_text(
            json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": 0})
        )
        arguments = ["finetune", "--arch", "edsr", "--preset", "tiny", "--shards", str(train_shards[0])]
        result = CliRunner().invoke(main, [*arguments, "--iters", "2", "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1
        assert f"another trainer is writing {out} (pid {holder.pid} on" in result.output
        assert not (out / "checkpoints").exists() and not (out / "model.pth").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is taken over, and released when the run ends.
    assert finetune(_config(train_shards[0], out, iterations=2)).iterations == 2
    assert not (out / "_finetune.lock").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_the_lock_of_an_unreaped_dead_trainer_is_taken_over(tmp_path, train_shards):
    """A holder that died but was never reaped (a zombie: in a container, PID 1 may never reap orphans) is gone,
    though os.kill(pid, 0) still finds it."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        while not Path(f"/proc/{holder.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            time.sleep(0.05)  # exited, not yet waited for
        os.kill(holder.pid, 0)  # still found
        (out / "_finetune.lock").write_text(
            json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": 0})
        )
        assert finetune(_config(train_shards[0], out, iterations=2)).iterations == 2
    finally:
        holder.wait()


def _endless_run(shards: Path, out: Path) -> list[str]:
    """`factory finetune` arguments of a run that trains until it is killed."""
    options = "--arch edsr --preset tiny --workers 0 --iters 1000000 --batch-size 2 --patch-size 16".split()
    return ["finetune", *options, "--shards", str(shards), "--out", str(out)]


def _wait_for_lock(out: Path, process: subprocess.Popen, errors: Path) -> dict:
    """The lock record of the trainer writing `out`, once it holds it."""
    deadline = time.monotonic() + 120
    while not (out / "_finetune.lock").is_file():
        assert process.poll() is None and time.monotonic() < deadline, errors.read_text()[-3000:]
        time.sleep(0.1)
    return json.loads((out / "_finetune.lock").read_text())


# What torchrun does with a rank: a session of its own (so killing torchrun's process group does not reach it), and
# the elastic agent's environment.
LAUNCHER = """
import os, subprocess, sys
rank = subprocess.Popen(
    sys.argv[2:], start_new_session=True, env={**os.environ, "TORCHELASTIC_RUN_ID": "test"}, stderr=open(sys.argv[1], "w")
)
print(rank.pid, flush=True)
rank.wait()
"""
# The rank: `factory finetune`, with prctl taken away when the fallback (a thread watching the parent) is tested.
RANK = "import sys; import factory.finetune; {patch}; from factory.cli import main; main(sys.argv[1:])"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("watch", ["prctl", "thread"])
def test_ranks_exit_when_their_launcher_is_killed(tmp_path, train_shards, watch):
    out = tmp_path / "run"
    patch = {
        "prctl": "pass",
        "thread": "factory.finetune._set_parent_death_signal = lambda signal_number: False",
    }
    rank_command = [
        sys.executable,
        "-c",
        RANK.format(patch=patch[watch]),
        *_endless_run(train_shards[0], out),
    ]
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path / "rank.err"), *rank_command],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    rank_pid = int(launcher.stdout.readline())
    try:
        assert _wait_for_lock(out, launcher, tmp_path / "rank.err")["pid"] == rank_pid
        # A second trainer on the same folder is refused while the rank trains.
        with pytest.raises(FactoryError, match=rf"another trainer is writing .* \(pid {rank_pid} on"):
            finetune(_config(train_shards[0], out, iterations=2))
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while _running(rank_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(rank_pid), f"rank {rank_pid} outlived its launcher ({watch})"
    finally:
        if _running(rank_pid):
            os.kill(rank_pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    # The dead rank's lock is taken over by the next trainer.
    assert finetune(_config(train_shards[0], out, iterations=2, resume=False)).iterations == 2


@pytest.mark.slow  # ~15 s on two busy cores: torchrun and two ranks start
@pytest.mark.skipif(
    sys.platform != "linux" or _console_script("torchrun") is None or _console_script("factory") is None,
    reason="needs Linux, torchrun and the factory script",
)
def test_torchrun_ranks_exit_when_torchrun_is_killed(tmp_path, train_shards):
    out, errors = tmp_path / "ddp", tmp_path / "torchrun.err"
    command = [_console_script("torchrun"), "--standalone", "--nproc-per-node=2", _console_script("factory")]
    command += _endless_run(train_shards[0], out)
    with errors.open("w") as stderr:
        torchrun = subprocess.Popen(
            command,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    ranks: list[int] = []
    try:
        _wait_for_lock(out, torchrun, errors)
        ranks = [
            int(pid) for pid in Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split()
        ]
        assert len(ranks) == 2
        os.killpg(torchrun.pid, signal.SIGKILL)  # the process group of torchrun, which the ranks are not in
        torchrun.wait()
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(pid) for pid in ranks)
    finally:
        for pid in ranks:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if torchrun.poll() is None:
            os.killpg(torchrun.pid, signal.SIGKILL)
            torchrun.wait()


# --- one-line errors before training ---------------------------------------------------------------------------------


def test_resuming_with_another_preset_says_what_differs(tmp_path, train_shards):
    finetune(_config(train_shards[0], tmp_path / "run", iterations=2))
    with pytest.raises(FactoryError, match=r"iter_0000002.pt .*--preset tiny.*--preset paper") as caught:
        finetune(_config(train_shards[0], tmp_path / "run", iterations=4, preset="paper"))
    assert "\n" not in str(caught.value)


def test_iters_below_the_checkpoint_is_refused_and_writes_nothing(tmp_path, train_shards):
    out = tmp_path / "run"
    finetune(_config(train_shards[0], out, iterations=4))
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(FactoryError, match=r"already at iteration 4, past --iters 2") as caught:
        finetune(_config(train_shards[0], out, iterations=2))
    assert "\n" not in str(caught.value)
    with pytest.raises(FactoryError, match=r"already at iteration 4 of --iters 4"):
        finetune(_config(train_shards[0], out, iterations=4))
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_fewer_selected_pairs_than_readers_is_one_line_before_training(tmp_path, train_shards):
    shards, manifests = train_shards
    config = _config(shards, tmp_path / "run", manifests=str(manifests), where="delta_e < 0.1", workers=2)
    with pytest.raises(FactoryError, match=r"select 1 pair .*for 2 readers \(1 rank x 2 workers\)") as caught:
        finetune(config)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_patch_larger_than_the_lr_images_is_one_line_before_training(tmp_path, train_shards):
    config = _config(train_shards[0], tmp_path / "run", patch_size=32, workers=2)  # the LR images are 24x24
    with pytest.raises(
        FactoryError, match=r"--patch-size 32 is larger than the LR images .* \(24x24"
    ) as caught:
        finetune(config)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("cores", "local_ranks", "shards", "world_size", "expected"),
    [
        (2, 1, 4, 1, 1),  # two cores: one for the trainer, one for a reader
        (64, 8, 21, 8, 2),  # eight ranks on a 64-core node, DF2K's 21 shards: 21 // 8 readers' worth per rank
        (64, 8, 100, 8, 4),  # at most 4
        (2, 2, 4, 2, 0),  # a core per rank: the rank reads itself
        (16, 1, 1, 1, 1),  # one shard: one worker reads it
        (16, 2, 1, 2, 0),  # one shard, two ranks: each rank reads in its own process
    ],
)
def test_default_workers_follow_the_cores_and_the_shards(
    monkeypatch, cores, local_ranks, shards, world_size, expected
):
    from factory.finetune import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert default_workers([shards], world_size) == expected


def test_the_default_workers_raise_no_warnings_on_two_cores(tmp_path, train_shards, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    arguments = ["finetune", "--arch", "edsr", "--preset", "tiny", "--shards", str(train_shards[0])]
    arguments += ["--iters", "2", "--batch-size", "4", "--patch-size", "16", "--out", str(tmp_path / "run")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, arguments)  # no --workers: the default
    assert result.exit_code == 0, result.output
    assert "2 iterations" in result.output
    # torch's "This DataLoader will create 4 worker processes in total. Our suggested max number of worker ..."
    assert not [warning for warning in caught if "worker processes" in str(warning.message)]


def test_a_cut_shard_stops_training_in_one_line_and_allow_partial_trains_with_the_counts(
    tmp_path, photos, caplog
):
    """A shard cut inside its second sample: with --manifests an error naming it and the counts (raised in a
    DataLoader worker, yet one line); with --allow-partial the run trains on the pair there is and says so."""
    import tarfile

    shards, manifests = tmp_path / "shards", tmp_path / "manifests"
    (shard,) = write_pairs(shards, manifests, crops(photos, size=96, per_photo=1)[:4], per_shard=4)
    with tarfile.open(shard) as archive:
        second = [member for member in archive if member.name.endswith(".hr.npy.zst")][1]
    shard.write_bytes(shard.read_bytes()[: second.offset_data + 100])
    arguments = ["finetune", "--arch", "edsr", "--preset", "tiny", "--shards", str(shards / "bicubic")]
    arguments += ["--manifests", str(manifests), "--iters", "2", "--batch-size", "4", "--patch-size", "16"]
    arguments += ["--patches-per-pair", "4", "--seed", "1"]
    result = CliRunner().invoke(main, [*arguments, "--workers", "2", "--out", str(tmp_path / "strict")])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1
    # Each of the 2 workers reads 2 of the 4 pairs; whichever meets the cut first stops the run.
    assert re.search(
        r"error: shard bicubic/bicubic-000000.tar: expected 2, read [01], missing [12], corrupt 0 \(.*\) in "
        r"epoch 0 \(rank 0, DataLoader worker [01]\).*--allow-partial",
        result.output,
    )
    assert not (tmp_path / "strict" / "model.pth").exists()

    with caplog.at_level(logging.WARNING, logger="factory.stream"):
        partial = CliRunner().invoke(
            main, [*arguments, "--workers", "0", "--allow-partial", "--out", str(tmp_path / "partial")]
        )
    assert partial.exit_code == 0, partial.output
    (line,) = [record.getMessage() for record in caplog.records if record.name == "factory.stream"]
    # 8 patches per epoch, 4 per pair: a whole pass (4 expected, 1 read), then the one pair of the next, where the
    # epoch ends (what it did not reach is not counted).
    assert "epoch 0, rank 0" in line and "bicubic/bicubic-000000.tar: expected 5, read 2, missing 3" in line


def test_finetune_arguments_read_back_through_the_cli_to_the_same_config(tmp_path, monkeypatch):
    """The torchrun path (factory study, `processes` > 1) passes a FinetuneConfig as `factory finetune` arguments.
    Reference: the CLI's own click parser, which turns them back into a config; every field set off its default."""
    from factory import finetune as finetune_module
    from factory.finetune import FINETUNE_OPTIONS, finetune_arguments, single_node_finetune_command

    config = FinetuneConfig(
        architecture="swinir",
        pretrained=str(tmp_path / "weights with space.pth"),
        preset="tiny",
        shards=(str(tmp_path / "a"), "s3://bucket/b/{000..003}.tar"),
        dataset_weights=(3.0, 0.1),
        manifests=str(tmp_path / "manifests"),
        where="label = 'defocus_blur' and delta_e < 5",
        allow_partial=True,
        iterations=7,
        batch_size=3,
        patch_size=24,
        learning_rate=1e-4 / 3,  # a float whose decimal form is long
        patches_per_pair=2,
        workers=0,
        checkpoint_every=5,
        log_every=2,
        amp=False,
        resume=False,
        seed=11,
        out=str(tmp_path / "run"),
        loss="esrgan",
        vgg_weights=str(tmp_path / "vgg19.pth"),
    )
    defaults = FinetuneConfig()
    unset = [
        f.name for f in dataclasses.fields(config) if getattr(config, f.name) == getattr(defaults, f.name)
    ]
    assert unset == ["perceptual_layer"]  # the one field without an option
    assert set(FINETUNE_OPTIONS) == {f.name for f in dataclasses.fields(config)} - {"perceptual_layer"}
    seen: list[FinetuneConfig] = []

    def capture(parsed: FinetuneConfig) -> FinetuneResult:
        seen.append(parsed)
        return FinetuneResult(
            weights=Path(parsed.out) / "model.pth", iterations=0, final_loss=0.0, patches_per_second=0.0
        )

    monkeypatch.setattr(finetune_module, "finetune", capture)
    for candidate in (config, dataclasses.replace(defaults, shards=("shards",))):  # --shards is required
        run = CliRunner().invoke(main, ["finetune", *finetune_arguments(candidate)])
        assert run.exit_code == 0, run.output
        assert seen[-1] == candidate
    command = single_node_finetune_command(config, 2)
    assert command[:7] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--no-python",
        sys.executable,
    ]
    assert command[7:11] == ["-m", "factory.cli", "-v", "finetune"]
    assert command[11:] == finetune_arguments(config)
    with pytest.raises(FactoryError, match="perceptual_layer='conv3_4' has no command-line option"):
        finetune_arguments(dataclasses.replace(config, perceptual_layer="conv3_4"))
