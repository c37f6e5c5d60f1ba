"""Training at scale never hangs and never loses work: tar shards with any worker count and bad samples, many
processes, pre-emption, a run directory shared by mistake, damaged checkpoints (issue 15).

Every run here is guarded by `deadline`: a hang fails the test instead of running forever. The expected step counts
are hand-computed from the dataset sizes (the agreed per-rank sample count: all samples // processes // batch).
"""

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

import cvt
from cvt.data import create_eval_transform, make_dataset, open_dataset, write_shards
from cvt.train import TrainConfig, train

TINY = {"dims": [16, 32, 48], "depths": [1, 1, 1], "heads": [1, 1, 2]}

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def deadline(seconds: int):
    """Raise TimeoutError in the test if the body runs longer than `seconds` (a hang fails, it does not wait)."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the run hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def small_config(data, output, **kw) -> TrainConfig:
    """The demo recipe shrunk: a tiny CvT on 32x32 images, no validation, batch 4."""
    base = {
        "model_kwargs": dict(TINY),
        "data": str(data),
        "val_split": None,
        "input_size": 32,
        "batch_size": 4,
        "num_workers": 0,
        "epochs": 1,
        "warmup_epochs": 0,
        "lr": 1e-3,
        "amp": "none",
        "auto_augment": None,
        "mixup_alpha": 0.0,
        "cutmix_alpha": 0.0,
        "output": str(output),
        "progress": False,
        "deterministic": True,
    }
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The issue's dataset: 60 training images per class, 3 classes, 32x32."""
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", num_classes=3, train_per_class=60,
                        val_per_class=2, image_size=32)  # fmt: skip


def shards_of(folder, out, shard_size, zero=None):
    """`cvt write-shards --shard-size N` of the training split; `zero`: index of a sample whose image is zeroed."""
    train_ds = open_dataset(folder, split="train")
    samples = list(train_ds.samples)
    if zero is not None:
        bad = out.parent / f"{out.name}-zeroed.png"  # a file of zeros where an image should be
        bad.write_bytes(b"\0" * 600)
        samples[zero] = (str(bad), samples[zero][1])
    write_shards(samples, train_ds.classes, out / "train", shard_size=shard_size)
    return out


@pytest.fixture(scope="module")
def shards45(folder, tmp_path_factory):
    return shards_of(folder, tmp_path_factory.mktemp("s45") / "shards", 45)  # 4 shards of 45


def test_shard_epoch_ends_with_two_loader_workers(shards45, tmp_path):
    # each worker reads 2 shards = 90 samples = 22 batches of 4 and drops 2: 44 batches where 180 // 4 = 45 are
    # counted. Before: the epoch never ended (step 44 of 45, last.pt rewritten forever).
    with deadline(120):
        summary = train(small_config(shards45, tmp_path / "run", num_workers=2))
    assert summary["completed"] and summary["global_step"] == 45


def test_shard_epoch_ends_with_a_zeroed_image(folder, tmp_path):
    # one of the 180 images is unreadable: one pass yields 179 samples, 44 batches + 3; the epoch wraps around
    data = shards_of(folder, tmp_path / "shards", 45, zero=7)
    with deadline(120):
        summary = train(small_config(data, tmp_path / "run", num_workers=0))
    assert summary["completed"] and summary["global_step"] == 45


def test_shard_run_resumes_bit_exact_with_workers(shards45, tmp_path):
    kw = {"num_workers": 2}
    with deadline(180):
        full = train(small_config(shards45, tmp_path / "full", **kw))
        stopped = train(small_config(shards45, tmp_path / "split", max_steps=19, **kw))
        mid = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
        assert (mid["epoch"], mid["step"], mid["global_step"]) == (0, 19, 19) and not stopped["completed"]
        resumed = train(small_config(shards45, tmp_path / "split", resume="auto", **kw))
    assert resumed["completed"] and resumed["global_step"] == full["global_step"] == 45
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]


def write_config(path, cfg: TrainConfig):
    path.write_text(
        '"""A tiny run.\n\n    cvt train --config tiny.py\n\nResult: none to speak of.\n"""\n'
        f"from cvt.train import TrainConfig\n\n\ndef get_config():\n    return TrainConfig(**{cfg.to_dict()!r})\n"
    )
    return path


def torchrun(tmp_path, cfg: TrainConfig, *launcher, args=(), script=None, env=None, timeout=300):
    """`torchrun <launcher> -m cvt train --config <cfg> <args>` (or `script` instead of `-m cvt`); a hang fails."""
    config = write_config(tmp_path / "tiny.py", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    target = [str(script)] if script else ["-m", "cvt"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, *target, "train", "--config", str(config), *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"torchrun still running after {timeout} s: the run hangs\n{err.stderr}") from None


@pytest.mark.slow
def test_torchrun_two_ranks_on_uneven_shards(folder, tmp_path):
    # shards of 50, 50, 50 and 30 samples dealt to 2 ranks: 100 and 80 samples (which rank gets which changes per
    # epoch). Before: 25 and 20 steps per epoch, and the run deadlocked. Agreed: 180 // 2 // 4 = 22 steps on each.
    data = shards_of(folder, tmp_path / "shards", 50)
    cfg = small_config(data, tmp_path / "run", epochs=2, num_workers=1)
    proc = torchrun(tmp_path, cfg, "--standalone", "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == 2 * 22 and ckpt["epoch"] == 2


# ---- pre-emption ------------------------------------------------------------------------------------------------


def send_signal_at(monkeypatch, signum, batch):
    """Deliver `signum` to this process while the run fetches its `batch`-th micro-batch (counting from 0)."""
    import cvt.train.loop as loop

    real, seen = loop.train_one_epoch, [0]

    def sending(batches):
        for item in batches:
            if seen[0] == batch:
                os.kill(os.getpid(), signum)
            seen[0] += 1
            yield item

    def patched(model, batches, *args, **kwargs):
        return real(model, sending(batches), *args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", patched)


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    """1 epoch of 180 // 8 = 22 steps on the folder, without interruption."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("full") / "run"
    summary = train(small_config(folder, out, batch_size=8))
    return summary, torch.load(out / "last.pt", weights_only=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_the_state_and_resume_is_bit_exact(folder, tmp_path, monkeypatch, uninterrupted,
                                                                    signum, caplog):  # fmt: skip
    def unhandled(sig, frame):  # before: the signal's default action ended the process, all since last.pt lost
        raise AssertionError(f"{signal.Signals(sig).name} reached the test: the run did not handle it")

    previous = signal.signal(signum, unhandled)
    try:
        send_signal_at(monkeypatch, signum, 9)
        with deadline(120):
            stopped = train(small_config(folder, tmp_path / "run", batch_size=8))
    finally:
        signal.signal(signum, previous)
    monkeypatch.undo()
    name = signal.Signals(signum).name
    assert stopped["preempted"] == name and not stopped["completed"] and stopped["global_step"] == 10
    assert any(f"{name}: stopped at epoch 1, step 10" in r.getMessage() and "exit code 75" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    mid = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (mid["epoch"], mid["step"], mid["global_step"]) == (0, 10, 10)
    with deadline(120):
        resumed = train(small_config(folder, tmp_path / "run", batch_size=8, resume="auto"))
    full_summary, full = uninterrupted
    assert resumed["completed"] and resumed["preempted"] is None and resumed["global_step"] == 22
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    for key in full["model"]:
        assert torch.equal(last["model"][key], full["model"][key]), key
    assert last["history"][0]["train_loss"] == full["history"][0]["train_loss"]


def test_resume_auto_starts_a_new_run_where_there_is_none(folder, tmp_path):
    with deadline(120):
        summary = train(small_config(folder, tmp_path / "run", batch_size=8, resume="auto", max_steps=2))
    assert summary["global_step"] == 2 and (tmp_path / "run" / "last.pt").is_file()


KILL_RANK = """
import os, signal, sys

import cvt.train.loop as loop
from cvt.cli import main

real, seen = loop.train_one_epoch, [0]


def patched(model, batches, *args, **kwargs):
    def killing(batches):
        for item in batches:
            first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            if seen[0] == {at} and os.environ["RANK"] == "{rank}" and first:
                os.kill(os.getpid(), signal.SIGKILL)  # no handler, no clean-up: a lost node
            seen[0] += 1
            yield item

    return real(model, killing(batches), *args, **kwargs)


loop.train_one_epoch = patched
sys.exit(main())
"""


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_a_killed_rank_by_itself(folder, tmp_path):
    # 2 ranks x batch 4 on 180 images: 22 steps; last.pt every 5 steps; rank 1 is killed during step 13
    cfg = small_config(folder, tmp_path / "run", save_every_steps=5)
    script = tmp_path / "kill_rank.py"
    script.write_text(KILL_RANK.replace("{at}", "12").replace("{rank}", "1"))
    launcher = ("--standalone", "--nproc-per-node", "2", "--max-restarts", "1")
    # a restarted gloo group reads the first attempt's addresses from torchrun's shared store unless it is
    # disabled (pytorch/pytorch#135712): the restart then fails to connect or waits for ever
    restart_env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = torchrun(tmp_path, cfg, *launcher, args=["--resume"], script=script, env=restart_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "at epoch 1, step 10" in proc.stderr  # from 1, as the log counts
    (tmp_path / "ref").mkdir()
    ref = torchrun(tmp_path / "ref", small_config(folder, tmp_path / "ref" / "run"), "--standalone",
                   "--nproc-per-node", "2")  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    a = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ref" / "run" / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 22
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.slow
def test_cli_sigterm_exits_75_with_the_state_saved(folder, tmp_path):
    config = write_config(tmp_path / "tiny.py", small_config(folder, tmp_path / "run", epochs=50, batch_size=8))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cvt", "train", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stderr:  # the first line of training: the run has started
            if "step(s) per epoch" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "SIGTERM: stopped at epoch" in err and "cvt train --resume" in err
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert json.loads(out)["preempted"] == "SIGTERM" and ckpt["global_step"] < 50 * 22


# ---- the run directory ------------------------------------------------------------------------------------------


def test_second_run_on_a_run_directory_is_refused_naming_the_owner(folder, tmp_path):
    out = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live run's process
    try:
        out.mkdir()
        lock = {"pid": owner.pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}
        (out / "run.lock").write_text(json.dumps(lock))
        with deadline(60), pytest.raises(RuntimeError, match=rf"in use by another run: pid {owner.pid} on host"):
            train(small_config(folder, out, max_steps=1))
    finally:
        owner.kill()
        owner.wait()
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing of the second run written


def test_stale_lock_is_taken_over_and_released(folder, tmp_path, caplog):
    out = tmp_path / "run"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out.mkdir()
    (out / "run.lock").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()}))
    (out / ".last.pt.abc123.tmp").write_bytes(b"\0" * 1000)  # a killed run's unfinished atomic write
    with deadline(60):
        summary = train(small_config(folder, out, max_steps=1))
    assert summary["global_step"] == 1
    assert any("stale lock" in r.getMessage() for r in caplog.records)
    assert not (out / "run.lock").exists() and not (out / ".last.pt.abc123.tmp").exists()


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs (not an Exception, so no handler of the run catches it)."""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """3 classes x 8 training + 4 validation images: 3 steps of 8 per epoch."""
    return make_dataset(tmp_path_factory.mktemp("small") / "shapes", num_classes=3, train_per_class=8,
                        val_per_class=4, image_size=32)  # fmt: skip


def test_kill_between_last_and_best_leaves_best_consistent_after_resume(small, tmp_path, monkeypatch):
    kw = {"batch_size": 8, "epochs": 4, "val_split": "val", "lr": 3e-3}
    with deadline(120):
        full = train(small_config(small, tmp_path / "full", **kw))
    best_epoch = full["best_epoch"] - 1  # the summary counts from 1, the state from 0; later epochs do not beat it
    import cvt.train.loop as loop

    real = loop.save_checkpoint

    def killed_after_last(path, run, state, *args, **kwargs):
        real(path, run, state, *args, **kwargs)
        if path.name == "last.pt" and state.step == 0 and state.epoch == best_epoch + 1:
            raise Killed  # last.pt of the best epoch is on disk, best.pt not yet

    monkeypatch.setattr(loop, "save_checkpoint", killed_after_last)
    with deadline(120), pytest.raises(Killed):
        train(small_config(small, tmp_path / "run", **kw))
    monkeypatch.undo()
    (tmp_path / "run" / "run.lock").unlink(missing_ok=True)  # a kill -9 leaves its lock (a PID alive here)
    with deadline(120):
        resumed = train(small_config(small, tmp_path / "run", resume="auto", **kw))
    assert resumed["best_epoch"] == full["best_epoch"] and resumed["best_top1"] == full["best_top1"]
    a = torch.load(tmp_path / "full" / "best.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "best.pt", weights_only=True)  # before: the previous best's, or none
    assert b["best"]["epoch"] == best_epoch
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_damaged_last_pt_falls_back_to_the_previous_one(small, tmp_path, caplog):
    kw = {"batch_size": 8, "epochs": 2}
    with deadline(120):
        full = train(small_config(small, tmp_path / "full", **kw))
        train(small_config(small, tmp_path / "run", max_steps=4, **kw))  # last.pt at epoch 1 step 1, prev at 1/0
        last = tmp_path / "run" / "last.pt"
        last.write_bytes(last.read_bytes()[:5000])  # torn by a failing disk
        resumed = train(small_config(small, tmp_path / "run", resume="auto", **kw))
    assert any(f"cannot read {last}" in r.getMessage() and "last.prev.pt instead" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert resumed["completed"] and resumed["global_step"] == full["global_step"] == 6
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_full_disk_names_the_file_and_keeps_the_previous_checkpoint(small, tmp_path, monkeypatch):
    kw = {"batch_size": 8, "epochs": 2}
    with deadline(120):
        train(small_config(small, tmp_path / "run", max_steps=3, **kw))
    last = tmp_path / "run" / "last.pt"
    before = last.read_bytes()
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        return FullDisk(f) if "b" in mode and "w" in mode else f

    monkeypatch.setattr(os, "fdopen", fdopen)
    full_disk = rf"cannot write {last}: No space left on device \(the disk is full"
    with deadline(120), pytest.raises(OSError, match=full_disk):
        train(small_config(small, tmp_path / "run", resume="auto", **kw))
    monkeypatch.undo()
    assert last.read_bytes() == before and not list(last.parent.glob(".last.pt.*.tmp"))


def test_weights_that_give_a_non_finite_loss_are_never_kept_as_the_good_checkpoint(small, tmp_path):
    # save_every_steps=1: last.pt is written after every step, also after the one that blew the weights up
    kw = {"batch_size": 8, "epochs": 3, "save_every_steps": 1}
    with deadline(120):
        train(small_config(small, tmp_path / "run", max_steps=3, **kw))  # one good epoch
    last = tmp_path / "run" / "last.pt"
    with deadline(120), pytest.raises(RuntimeError, match="non-finite loss .*replaced by the previous checkpoint"):
        train(small_config(small, tmp_path / "run", resume="auto", lr=1e30, **kw))
    # the kept checkpoint's weights, run on real images outside the training code, give finite logits
    model = cvt.load_model(last).eval()
    data = open_dataset(small, split="train", transform=create_eval_transform(model.data_config))
    images = torch.stack([data[i][0] for i in range(8)])
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()


# ---- data ---------------------------------------------------------------------------------------------------------


def test_symlink_loop_in_a_class_folder_counts_every_image_once(small, tmp_path, capsys):
    from cvt.cli import main

    data = tmp_path / "data"
    shutil.copytree(small, data)
    first = sorted(p.name for p in (data / "train").iterdir())[0]
    (data / "train" / first / "loop").symlink_to("..")  # the class folder links back to train/: a loop
    (data / "train" / first / "again.png").symlink_to(next((data / "train" / first).glob("*.png")))
    ds = open_dataset(data, split="train")
    assert len(ds) == 24  # 3 classes x 8; before: thousands, most under the wrong label
    assert sorted(label for _, label in ds.samples) == sorted([0, 1, 2] * 8)
    assert main(["check-data", str(data), "--split", "train"]) == 0
    assert "24 readable images, 3 classes (8-8 per class)" in capsys.readouterr().out


def test_write_shards_killed_part_way_is_refused_and_a_changed_shard_too(small, tmp_path, monkeypatch):
    import cvt.data.shards as shards_module

    train_ds = open_dataset(small, split="train")
    real, added = shards_module._add_member, [0]

    def dying(tar, name, data):
        added[0] += 1
        if added[0] > 2 * 10:  # the kill comes inside shard 3 of 5: shards 1 and 2 are finished
            raise Killed
        real(tar, name, data)

    monkeypatch.setattr(shards_module, "_add_member", dying)
    with pytest.raises(Killed):
        write_shards(train_ds.samples, train_ds.classes, tmp_path / "cut", shard_size=5)
    monkeypatch.undo()
    assert len(list((tmp_path / "cut").glob("*.tar"))) == 2  # before: opened silently as 10 of 24 samples
    with pytest.raises(ValueError, match=r"no shards.json beside the shards.*unfinished `cvt write-shards`"):
        open_dataset(tmp_path / "cut")
    write_shards(train_ds.samples, train_ds.classes, tmp_path / "whole", shard_size=5)
    assert len(open_dataset(tmp_path / "whole")) == 24
    manifest = json.loads((tmp_path / "whole" / "shards.json").read_text())
    assert manifest["classes"] == train_ds.classes and manifest["samples"] == 24
    assert [v["samples"] for v in manifest["shards"].values()] == [5, 5, 5, 5, 4]
    (tmp_path / "whole" / "shard-000004.tar").unlink()
    with pytest.raises(ValueError, match=r"lacks shard\(s\) shard-000004.tar that .*shards.json lists"):
        open_dataset(tmp_path / "whole")
    shard = tmp_path / "whole" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"shard-000001.tar has 3000 bytes, .* records \d+: the shard changed"):
        open_dataset(tmp_path / "whole" / "shard-{000000..000003}.tar")


# ---- damaged and wrong checkpoints on the resume path -----------------------------------------------------------


class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def finished_run(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train(small_config(small, out, batch_size=8, val_split="val"))
    return out


@pytest.mark.parametrize("kind", ["empty", "garbage", "code", "state_dict", "best", "truncated_last"])
@pytest.mark.parametrize("with_config", [False, True])
def test_resume_from_a_wrong_file_says_what_it_is_and_what_to_do(finished_run, small, tmp_path, capsys, kind,
                                                                  with_config):  # fmt: skip
    from cvt.cli import main

    marker = tmp_path / "code-ran"
    path = tmp_path / "run" / ("last.pt" if kind == "truncated_last" else f"{kind}.pt")
    path.parent.mkdir()
    expected = {
        "empty": "is not a checkpoint: the file is empty",
        "garbage": "not a PyTorch or safetensors file",
        "code": "refusing to load",
        "state_dict": "holds a state dict of 1 tensors (model weights); fine-tune from it with --set init=",
        "best": "(a best.pt); resume from the run's last.pt",
        "truncated_last": "no last.prev.pt beside it to fall back to",
    }[kind]
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"not a checkpoint at all " * 20)
    elif kind == "code":
        torch.save({"model": WritesAFile(marker)}, path)
    elif kind == "state_dict":
        torch.save({"weight": torch.zeros(3)}, path)
    elif kind == "best":
        shutil.copy(finished_run / "best.pt", path)
    else:
        path.write_bytes((finished_run / "last.pt").read_bytes()[:20000])
    args = ["train", "--resume", str(path)]
    if with_config:
        config = write_config(tmp_path / "tiny.py", small_config(small, tmp_path / "run", batch_size=8))
        args += ["--config", str(config)]
    with deadline(120):
        code = main(args)
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and not marker.exists()
    assert f"cvt train: error: {path}" in err or f"{path}:" in err or f"{path} " in err, err
    assert expected in err, err


# ---- settings -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "message"), [
    ("epochs=one", "epochs must be an int, got 'one'"),
    ("lr=nan", "lr must be a finite number, got nan"),
    ("lr_per_256=inf", "lr_per_256 must be a finite number, got inf"),
    ("weight_decay=abc", "weight_decay must be a number, got 'abc'"),
    ("epochs=0", "epochs must be >= 1, got 0"),
    ("batch_size=2.5", "batch_size must be an int, got 2.5"),
    ("scale=(0.5,)", "scale must be a tuple of 2 numbers or None, got (0.5,)"),
])  # fmt: skip
def test_set_values_are_checked_before_anything_is_created(small, tmp_path, capsys, setting, message):
    from cvt.cli import main

    config = write_config(tmp_path / "tiny.py", small_config(small, tmp_path / "run"))
    assert main(["train", "--config", str(config), "--set", setting]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_unusable_output_fails_before_data_and_model_are_built(tmp_path):
    (tmp_path / "file").write_text("a file where the run directory should go")
    cfg = small_config(tmp_path / "no-such-data", tmp_path / "file" / "run")
    with pytest.raises(ValueError, match=r"file is a file, so .*file/run cannot be created inside it: choose another"):
        train(cfg)  # before: the missing data was found first, an unwritable output only after building


@pytest.mark.slow
def test_two_nodes_on_one_machine_with_a_c10d_rendezvous(folder, tmp_path):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(tmp_path / "tiny.py", small_config(folder, tmp_path / "run", num_workers=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "issue15",
                "-m", "cvt", "train", "--config", str(config)]  # fmt: skip
    nodes = [subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]  # fmt: skip
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    except subprocess.TimeoutExpired:
        raise AssertionError("the two-node run still runs after 300 s: it hangs") from None
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == 180 // 2 // 4 and ckpt["epoch"] == 1
    assert sum(json.loads(out)["completed"] for out, _ in outputs if out.strip()) == 1  # rank 0's summary


@pytest.mark.slow
def test_torchrun_sigterm_stops_every_rank_at_one_step_and_resume_is_exact(folder, tmp_path):
    # a scheduler stops the job: SIGTERM to torchrun, which passes it to both ranks; they agree on a step and save
    # signalled once the first epoch has ended (not after a fixed sleep: on an idle machine three epochs took under
    # two seconds and the run had finished), with seven epochs still to go
    epochs = 8
    cfg = small_config(folder, tmp_path / "run", epochs=epochs)
    config = write_config(tmp_path / "tiny.py", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cvt",
           "train", "--config", str(config)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        with deadline(120):
            for line in proc.stderr:
                if f"epoch 1/{epochs}" in line:
                    break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "SIGTERM: stopped at epoch" in err, err[-3000:]
    mid = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert 22 <= mid["global_step"] < epochs * 22 and len(mid["rng"]) == 2
    done = torchrun(tmp_path, cfg, "--standalone", "--nproc-per-node", "2", args=["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp_path / "ref").mkdir()
    ref = torchrun(tmp_path / "ref", small_config(folder, tmp_path / "ref" / "run", epochs=epochs), "--standalone",
                   "--nproc-per-node", "2")  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    a = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ref" / "run" / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == epochs * 22
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.slow
def test_two_real_runs_on_one_output_the_second_is_refused(folder, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "tiny.py", small_config(folder, out, epochs=50, batch_size=8))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "cvt", "train", "--config", str(config)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        for line in first.stderr:
            if "step(s) per epoch" in line:
                break
        config_before = (out / "config.json").read_text()
        with deadline(60), pytest.raises(RuntimeError, match=rf"in use by another run: pid {first.pid} on host"):
            train(small_config(folder, out, epochs=2, lr=5e-4))  # before: both "completed" into one folder
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 75 and (out / "config.json").read_text() == config_before
    assert not (out / "run.lock").exists()  # released by its owner
