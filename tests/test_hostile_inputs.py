"""Inputs that are not what their name says, one bad item among good ones, and pre-emption with loader workers
(issue 23, classes 3, 4 and 5, and the predict/eval arguments of class 7).

Each case here was seen failing before its fix: a FIFO named x.jpg hung `cvt eval`, a damaged tar header dropped
samples without a word, `cvt predict` stopped at the first unreadable image, a process-group SIGTERM killed the
loader workers and the run with them.
"""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from cvt import create_model
from cvt.checkpoint import save_model
from cvt.cli import main
from cvt.config import DataConfig
from cvt.data import (
    ListDataset,
    UnreadableImageError,
    load_image,
    make_dataset,
    open_dataset,
    write_shards,
)
from cvt.data.tar_scan import iter_tar_samples
from cvt.train import TrainConfig, preempt
from test_train_scale import deadline  # a hang fails the test

TINY = {"dims": [16, 32, 48], "depths": [1, 1, 1], "heads": [1, 1, 2]}
BIAS = [3.0, 2.0, 1.0]  # the constant model's logits, whatever the image


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """3 classes x 8 training and 2 validation images, 32x32."""
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", num_classes=3, train_per_class=8,
                        val_per_class=2, image_size=32)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(shapes, tmp_path_factory):
    """A tiny model whose head answers BIAS for every image: class 0 first, whatever it sees."""
    model = create_model("cvt_13", num_classes=3, **TINY)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor(BIAS))
    model.data_config = DataConfig(input_size=(32, 32), crop_mode="center", crop_pct=0.875)
    model.class_names = sorted(p.name for p in (shapes / "val").iterdir())
    return save_model(model, tmp_path_factory.mktemp("model") / "m")


@pytest.fixture
def data(shapes, tmp_path):
    """A private copy of the dataset, to spoil."""
    return shutil.copytree(shapes, tmp_path / "shapes")


def write_config(path, cfg: TrainConfig):
    path.write_text('"""A tiny run.\n\n    cvt train --config tiny.py\n\nResult: none to speak of.\n"""\n'
                    "from cvt.train import TrainConfig\n\n\n"
                    f"def get_config():\n    return TrainConfig(**{cfg.to_dict()!r})\n")  # fmt: skip
    return path


def tiny_config(data, output, **kw) -> TrainConfig:
    base = dict(model_kwargs=dict(TINY), data=str(data), val_split=None, input_size=32, batch_size=4, epochs=1,
                warmup_epochs=0, amp="none", auto_augment=None, mixup_alpha=0.0, cutmix_alpha=0.0, output=str(output),
                progress=False, num_threads=1)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def val_files(root):
    return sorted(p for p in (root / "val").rglob("*") if p.is_file())


# ---- class 3: inputs that are not what their name says -----------------------------------------------------------


def test_fifo_named_jpg_is_skipped_by_eval_and_check_data_without_hanging(data, model_dir, tmp_path, capsys):
    fifo = data / "val" / val_files(data)[0].parent.name / "zz-pipe.jpg"
    os.mkfifo(fifo)
    with deadline(60):
        assert main(["check-data", str(data), "--split", "val"]) == 1
        captured = capsys.readouterr()
        assert f"{fifo}: not a regular file but a FIFO" in captured.out and "6 readable, 1 unreadable" in captured.out
        code = main(["eval", "--model", str(model_dir), "--data", str(data), "--json", str(tmp_path / "r.json"),
                     "--output", str(tmp_path / "eval"), "--no-optimize"])  # fmt: skip
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["count"] == 6 and [s["path"] for s in res["skipped"]] == [str(fifo)]
    assert str(fifo) in capsys.readouterr().err


def test_link_to_dev_zero_named_jpg_is_not_read(tmp_path):
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")
    with deadline(10), pytest.raises(UnreadableImageError, match="not a regular file but a character device"):
        load_image(link)


@pytest.mark.parametrize("kind", ["FIFO", "socket", "directory"])
def test_other_non_regular_files_are_refused_from_their_stat(tmp_path, kind):
    path, server = tmp_path / "x.jpg", socket.socket(socket.AF_UNIX)
    if kind == "FIFO":
        os.mkfifo(path)
    elif kind == "socket":
        server.bind(str(path))
    else:
        path.mkdir()
    with server, deadline(10), pytest.raises(UnreadableImageError, match=f"not a regular file but a {kind}"):
        load_image(path)


def test_file_above_the_size_limit_is_refused_before_it_is_read(shapes):
    image = val_files(shapes)[0]
    size = image.stat().st_size
    with pytest.raises(UnreadableImageError, match=f"{size:,} bytes is above the image file limit of 100 bytes"):
        load_image(image, max_bytes=100)
    assert load_image(image, max_bytes=size).size == (32, 32)


def damage_member_header(shard, index):
    """Overwrite the checksum of member `index`'s header (tar members of small files: one header + data blocks)."""
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[index]
    with open(shard, "r+b") as f:
        f.seek(member.offset + 148)  # the header's checksum field
        f.write(b"9999999\0")
    return member


@pytest.fixture
def one_shard(shapes, tmp_path):
    """The 24 training images in one shard (48 members)."""
    train = open_dataset(shapes, split="train")
    write_shards(train.samples, train.classes, tmp_path / "shards", shard_size=24, shuffle=False)
    return tmp_path / "shards"


def test_damaged_tar_header_mid_shard_is_counted_and_reported(one_shard, caplog, capsys):
    shard = one_shard / "shard-000000.tar"
    damage_member_header(shard, 28)  # the image of sample 14: before the fix samples 14-23 vanished silently
    dataset = open_dataset(one_shard)
    with caplog.at_level(logging.WARNING):
        assert dataset.verify() == 23  # the manifest says 24: the damage explains it
        assert "1 damaged stretch(es)" in caplog.text
        assert "member 28: bytes 42496-44032 are no tar member" in caplog.text
        caplog.clear()
        samples = list(dataset)  # what training reads: warned once per shard, with the count
        assert f"{shard}: 1 damaged stretch(es), the samples stored there are lost: member 28" in caplog.text
    assert len(samples) == 23  # only the sample whose header broke is lost
    assert any("member 28" in name for name in dataset.skipped)
    assert main(["check-data", str(one_shard)]) == 1
    out = capsys.readouterr().out
    assert f"{shard} member 28: damaged tar data" in out and "23 readable" in out


def test_manifest_whose_counts_lie_is_refused(one_shard, capsys):
    manifest = one_shard / "shards.json"
    record = json.loads(manifest.read_text())
    record["shards"]["shard-000000.tar"]["samples"] *= 4000
    manifest.write_text(json.dumps(record))
    lie = r"shard-000000.tar holds at most \d+ sample\(s\), its manifest shards.json records 96000"
    with pytest.raises(ValueError, match=lie):  # what sized the epoch: refused from the shard's size, for nothing
        open_dataset(one_shard).total_samples()
    assert main(["check-data", str(one_shard)]) == 1
    assert "holds 24 sample(s), its manifest shards.json records 96000" in capsys.readouterr().err
    record["shards"]["shard-000000.tar"]["samples"] = 25  # a lie the size allows: found by reading the shard
    manifest.write_text(json.dumps(record))
    dataset = open_dataset(one_shard)
    assert dataset.total_samples() == 25
    with pytest.raises(ValueError, match=r"shard-000000.tar holds 24 sample\(s\), its manifest shards.json records 25"):
        list(dataset)


def test_tar_member_above_the_size_limit_is_not_read(one_shard):
    shard = str(one_shard / "shard-000000.tar")
    _, files = next(iter_tar_samples(shard, max_bytes=100))
    assert isinstance(files["jpg"], UnreadableImageError)
    assert "above the image file limit of 100 bytes" in files["jpg"].reason
    assert files["cls"] == b"0"  # a small member is read


def test_a_shard_error_in_a_loader_worker_is_one_line(shapes, tmp_path, capsys):
    train = open_dataset(shapes, split="train")
    write_shards(train.samples, train.classes, tmp_path / "data" / "train", shard_size=12, shuffle=False)
    manifest = tmp_path / "data" / "train" / "shards.json"
    record = json.loads(manifest.read_text())
    record["shards"]["shard-000000.tar"]["samples"] = 13
    manifest.write_text(json.dumps(record))
    config = write_config(tmp_path / "tiny.py", tiny_config(tmp_path / "data", tmp_path / "run", num_workers=1))
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("cvt train: error: ") and "shard-000000.tar holds 12 sample(s)" in err  # no traceback


def test_label_out_of_range_in_a_shard_names_the_shard_and_sample(one_shard):
    (one_shard / "classes.txt").write_text("a\nb\n")  # the shard's labels run to 2
    dataset = open_dataset(one_shard)
    with pytest.raises(ValueError, match=r"shard-000000.tar sample 000000\d\d: label 2 is not a class index"):
        dataset.verify()
    with pytest.raises(ValueError, match=r"shard-000000.tar sample 000000\d\d: label 2 is not a class index"):
        list(dataset)


@pytest.mark.parametrize("name", ["two\nlines", "tab\there", " lead", "trail ", "a/b", "back\\slash", "", ".."])
def test_csv_class_name_that_cannot_round_trip_is_refused(shapes, tmp_path, name):
    images = val_files(shapes)
    rows = [(str(images[0]), "cat"), (str(images[1]), name), (str(images[2]), "dog")]
    csv_file = tmp_path / "list.csv"
    with open(csv_file, "w", newline="") as f:
        import csv  # noqa: PLC0415

        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)  # quoted: the spaces are the name's
    with pytest.raises(ValueError, match=r"class name .* cannot be written to classes.txt"):
        ListDataset(csv_file)


def test_csv_spaces_after_the_comma_are_formatting(shapes, tmp_path):
    images = val_files(shapes)
    csv_file = tmp_path / "list.csv"
    csv_file.write_text(f"{images[0]}, cat\n{images[1]}, dog\n")
    assert ListDataset(csv_file).classes == ["cat", "dog"]


def test_folder_and_classes_txt_names_that_cannot_round_trip_are_refused(data, one_shard):
    os.rename(data / "val" / val_files(data)[0].parent.name, data / "val" / "line\nbreak")
    with pytest.raises(ValueError, match=r"class name 'line\\nbreak' cannot be written"):
        open_dataset(data, split="val")
    (one_shard / "classes.txt").write_text("a\n b\nc\n")
    with pytest.raises(ValueError, match=r"class name ' b' cannot be written .*leading or trailing white space"):
        _ = open_dataset(one_shard).classes


# ---- class 4: one bad item spoils the rest -----------------------------------------------------------------------


def spoil(root):
    """One corrupt image and one FIFO named .jpg among the validation images; returns them."""
    corrupt = val_files(root)[1]
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    fifo = corrupt.parent / "zz-pipe.jpg"
    os.mkfifo(fifo)
    return corrupt, fifo


def test_predict_predicts_every_readable_image_and_lists_the_others(data, model_dir, capsys):
    corrupt, fifo = spoil(data)
    with deadline(60):
        code = main(["predict", "--model", str(model_dir), str(data / "val"), "--topk", "1", "--json", "--no-optimize"])
    captured = capsys.readouterr()
    assert code == 1
    results = json.loads(captured.out)
    failed = {r["path"]: r["error"] for r in results if "error" in r}
    assert set(failed) == {str(corrupt), str(fifo)} and "FIFO" in failed[str(fifo)]
    good = [r for r in results if "predictions" in r]
    assert len(good) == 5 and all(r["predictions"][0]["index"] == 0 for r in good)  # BIAS: class 0 first
    assert f"unreadable: {corrupt}" in captured.err and "2 of 7 image(s) could not be read" in captured.err
    assert main(["predict", "--model", str(model_dir), str(data / "val"), "--topk", "1", "--no-optimize"]) == 1
    assert len(capsys.readouterr().out.splitlines()) == 5


def test_eval_counts_exactly_the_readable_images(data, model_dir, tmp_path, capsys):
    corrupt, fifo = spoil(data)
    with deadline(60):
        code = main(["eval", "--model", str(model_dir), "--data", str(data), "--json", "--batch-size", "4",
                     "--output", str(tmp_path / "eval"), "--no-optimize"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    res = json.loads(captured.out)
    classes = res["classes"]
    # by hand: the model always answers class 0; 2 images per class, the corrupt one lost from its class
    per_class = {name: 2 - (name == corrupt.parent.name) for name in classes}
    assert res["count"] == 5 and {n: r["count"] for n, r in res["per_class"].items()} == per_class
    assert res["top1"] == pytest.approx(100 * per_class[classes[0]] / 5)
    assert {s["path"] for s in res["skipped"]} == {str(corrupt), str(fifo)}
    assert "2 unreadable image(s) left out" in captured.err and "eval" in captured.err  # and a progress bar


def cpu_out_of_memory():
    torch.empty(1 << 60, dtype=torch.uint8)  # the CPU allocator's own error: it cannot have an exabyte


def cuda_out_of_memory():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")  # its text on a GPU


def memory_error():
    raise MemoryError()


class Exhausted(torch.nn.Module):
    """A model whose forward runs out of memory (`fail`)."""

    num_classes = 3

    def __init__(self, fail):
        super().__init__()
        self.fail = fail

    def forward(self, x):
        self.fail()


@pytest.mark.parametrize("fail", [cpu_out_of_memory, cuda_out_of_memory, memory_error], ids=lambda f: f.__name__)
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_out_of_memory_names_batch_size(data, model_dir, tmp_path, monkeypatch, capsys, command, fail):
    module = "cvt.evaluate" if command == "eval" else "cvt.predict"
    monkeypatch.setattr(f"{module}.inference_model", lambda *args, **kwargs: Exhausted(fail))
    args = ["--data", str(data), "--output", str(tmp_path / "eval")] if command == "eval" else [str(data / "val")]
    assert main([command, "--model", str(model_dir), *args, "--batch-size", "16"]) == 1
    err = capsys.readouterr().err  # eval's progress bar, then one line
    assert err.count("error") == 1 and "Traceback" not in err
    assert f"cvt {command}: error: out of memory with --batch-size 16 (" in err and "); try --batch-size 8\n" in err


# ---- class 7: arguments of predict and eval ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-3", "0", "two"])
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_batch_size_below_one_is_a_usage_error(model_dir, capsys, command, value):
    args = ["--data", "x"] if command == "eval" else ["x.jpg"]
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--model", str(model_dir), *args, "--batch-size", value])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --batch-size" in last and value in last


def test_predict_json_into_a_closed_pipe_ends_quietly(shapes, model_dir):
    cmd = [
        sys.executable,
        "-m",
        "cvt",
        "predict",
        "--model",
        str(model_dir),
        str(shapes / "val"),
        "--json",
        "-",
        "--no-optimize",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # `| head` that has read enough: the reader is gone before anything is written
    try:
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert "BrokenPipeError" not in err and "Traceback" not in err, err


# ---- class 5: pre-emption with loader workers --------------------------------------------------------------------


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def wait_for(predicate, proc: subprocess.Popen, seconds: float, what: str) -> None:
    """Poll `predicate` until it holds; fail if `proc` ends first or `seconds` pass (a hang fails, it does not wait)."""
    end = time.monotonic() + seconds
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"no {what} after {seconds} s")
        time.sleep(0.02)


def test_process_group_sigterm_with_loader_workers_saves_and_exits_75(tmp_path):
    # what SLURM and Kubernetes do: SIGTERM to every process of the job, the loader workers included. Sent while
    # the workers make the first batches, what failed before the fix every time ("DataLoader worker killed by
    # signal", exit 1, nothing saved); 30 steps per epoch keep the kill away from an epoch's end.
    data = make_dataset(tmp_path / "data", num_classes=3, train_per_class=40, val_per_class=1, image_size=32)
    out = tmp_path / "run"
    cfg = tiny_config(data, out, num_workers=2, epochs=100)
    config = write_config(tmp_path / "tiny.py", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cvt", "train", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: len(children(proc.pid)) >= 2, proc, 120, "loader workers")
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 75, stderr[-3000:]
    assert "SIGTERM: stopped at epoch" in stderr and "killed by signal" not in stderr
    assert json.loads(stdout)["preempted"] == "SIGTERM"
    ckpt = torch.load(out / "last.pt", weights_only=True)  # the full state, that --resume continues from
    assert {"model", "optimizer", "global_step"} <= set(ckpt)


class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, index):
        time.sleep(0.005)
        return index


def test_loader_worker_outlives_a_foreign_sigterm_for_the_grace_only(monkeypatch):
    # the unit under the test above: a signal from elsewhere (the scheduler) does not stop a worker, for a while
    monkeypatch.setattr(preempt, "WORKER_GRACE_S", 3)  # read in the worker, forked after this
    batches = iter(preempt.ShieldedLoader(Slow(), batch_size=2, num_workers=1))
    assert next(batches).tolist() == [0, 1]
    (worker,) = batches._workers
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # sent by another process than the parent
    assert [next(batches).tolist() for _ in range(3)] == [[2, 3], [4, 5], [6, 7]]  # still serving
    assert worker.is_alive()
    with deadline(60), pytest.raises(RuntimeError, match=r"worker \(pid\(s\) \d+\) exited unexpectedly|exit code 1"):
        worker.join()  # ends after the grace, not never
        for _ in batches:
            pass
    assert worker.exitcode == 1


def test_loader_worker_ends_at_once_on_its_parents_sigterm():
    batches = iter(preempt.ShieldedLoader(Slow(), batch_size=2, num_workers=1))
    next(batches)
    (worker,) = batches._workers
    os.kill(worker.pid, signal.SIGTERM)  # the loader's own last resort (multiprocessing's terminate)
    worker.join(timeout=30)
    assert worker.exitcode == 0
    batches._shutdown_workers()
