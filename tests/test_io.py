"""lora._io: reproducible bytes, no debris after a killed writer, symlinks written through, read-only targets refused.
Exercised through lora.save_lora, as a user meets them."""

import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import lora
from lora._io import write_safetensors

REPO = Path(__file__).resolve().parents[1]

# A model with several adapted modules and settings, so the metadata has many keys to order.
MAKE_AND_SAVE = textwrap.dedent("""
    import sys, torch, torch.nn as nn, lora
    torch.manual_seed(0)
    model = nn.Sequential(lora.Linear(8, 8, r=2, lora_alpha=4), nn.ReLU(),
                          lora.MergedLinear(8, 12, r=2, enable_lora=[True, False, True]), lora.Embedding(5, 8, r=3))
    for m in model:
        for p in getattr(m, "lora_param_names", lambda: ())():
            getattr(m, p).data.normal_()
    lora.save_lora(model, sys.argv[1])
""")


def test_adapter_bytes_are_the_same_in_every_process(tmp_path):
    digests = set()
    for i in range(4):
        path = tmp_path / f"a{i}.safetensors"
        subprocess.run(
            [sys.executable, "-c", MAKE_AND_SAVE, str(path)],
            check=True,
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": str(i)},
        )
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_own_writer_reads_back_in_safetensors():
    tensors = {
        "b": torch.randn(3, 2, dtype=torch.bfloat16),
        "a": torch.arange(5),
        "c": torch.zeros(0),
        "d": torch.tensor([True, False]),
    }
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lora-io-{os.getpid()}.safetensors"
    try:
        write_safetensors(str(path), tensors, {"z": "1", "a": "2"})
        back = load_file(str(path))
        assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    finally:
        path.unlink(missing_ok=True)


# A child that starts a save and is killed half way through writing: it writes half a file, then waits.
KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch, lora, lora.checkpoint
    real = lora.checkpoint.write_safetensors
    def slow(path, tensors, metadata):
        real(path, tensors, metadata)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        print("writing", flush=True)
        time.sleep(60)
    lora.checkpoint.write_safetensors = slow
    layer = lora.Linear(64, 64, r=4)
    lora.save_lora(torch.nn.Sequential(layer), sys.argv[1])
""")


def test_a_killed_save_leaves_debris_that_the_next_save_and_load_remove(tmp_path):
    path = tmp_path / "adapter.safetensors"
    model = nn.Sequential(lora.Linear(64, 64, r=4))
    lora.save_lora(model, path)
    before = path.read_bytes()
    for _ in range(2):  # two kills; the second writer already removes the first one's temporary
        child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE)
        assert child.stdout.readline().strip() == b"writing"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    debris = [p for p in tmp_path.iterdir() if p != path]
    assert len(debris) == 1 and debris[0].stat().st_size > 0 and path.read_bytes() == before  # previous one intact
    lora.load_lora(nn.Sequential(nn.Linear(64, 64)), path)  # a load cleans up ...
    assert list(tmp_path.iterdir()) == [path]
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    lora.save_lora(model, path)  # ... and so does the next save
    assert list(tmp_path.iterdir()) == [path]


def test_a_running_writers_temporary_file_is_left_alone(tmp_path):
    path = tmp_path / "adapter.safetensors"
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"writing"
        lora.save_lora(nn.Sequential(lora.Linear(4, 4, r=2)), path)
        assert len([p for p in tmp_path.iterdir() if p != path]) == 1  # the live writer's file stays
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()


def test_save_writes_through_a_symlink(tmp_path):
    target = tmp_path / "store" / "real.safetensors"
    target.parent.mkdir()
    link = tmp_path / "adapter.safetensors"
    model = nn.Sequential(lora.Linear(4, 4, r=2))
    lora.save_lora(model, target)
    link.symlink_to(target)
    with torch.no_grad():
        model[0].lora_B.fill_(1.0)
    lora.save_lora(model, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert torch.equal(load_file(str(target))["0.lora_B"], torch.ones(4, 2))


def test_save_refuses_a_read_only_file_and_leaves_it(tmp_path):
    path = tmp_path / "adapter.safetensors"
    model = nn.Sequential(lora.Linear(4, 4, r=2))
    lora.save_lora(model, path)
    before = path.read_bytes()
    path.chmod(stat.S_IRUSR | stat.S_IRGRP)
    with torch.no_grad():
        model[0].lora_B.fill_(1.0)
    with pytest.raises(PermissionError, match="read-only"):
        lora.save_lora(model, path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IRUSR | stat.S_IRGRP


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "adapter.safetensors"
    model = nn.Sequential(lora.Linear(4, 4, r=2))
    lora.save_lora(model, path)
    path.chmod(0o640)
    time.sleep(0.01)
    lora.save_lora(model, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


# -- SafetensorsReader: safetensors' own files, read without a mapping ------------------------------------------


def test_reader_reads_what_safetensors_wrote(tmp_path):
    from safetensors.torch import save_file

    from lora._io import SafetensorsReader

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, 7, generator=g).bfloat16(),
        "f16": torch.randn(2, 3, 2, generator=g).half(),
        "f64": torch.randn(6, generator=g).double(),
        "i64": torch.arange(-3, 9),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 17, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    with SafetensorsReader(tmp_path / "t.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for key, want in tensors.items():
            assert f.shape(key) == tuple(want.shape)
            got = f.read(key)
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), key


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:5], "too short"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header length"),
        (lambda b: b[:8] + b"x" + b[9:], "malformed"),
        (lambda b: b[:-4], "do not match"),  # the last tensor's data runs past the end of the file
        (lambda b: b.replace(b'"F32"', b'"F99"'), "malformed header entry"),
    ],
)
def test_reader_refuses_a_damaged_file_naming_it(tmp_path, damage, message):
    from safetensors.torch import save_file

    from lora._io import SafetensorsReader

    save_file({"w": torch.ones(4, 4)}, tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage((tmp_path / "good.safetensors").read_bytes()))
    with pytest.raises(ValueError, match=message) as err:
        SafetensorsReader(bad)
    assert str(bad) in str(err.value)
