"""The runtime record: atomic, private, versioned, and upgraded from 2011."""

from __future__ import annotations

import json
import os
import stat

import pytest

from ganeti_kvm import errors, fsutil, runtime


def record() -> runtime.RuntimeRecord:
    return runtime.RuntimeRecord(name="web1", argv=["/usr/bin/kvm", "-name", "web1"],
                                 nics=[{"mac": "aa:00:00:00:00:01", "tap": "tap0"}],
                                 hvparams={"acpi": True}, beparams={"memory": 128},
                                 disks=[{"path": "/d", "readonly": False, "uri": None}])


def test_round_trip_and_mode(tmp_path) -> None:
    path = str(tmp_path / "web1.runtime")
    runtime.save(path, record())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = runtime.load(path, "web1")
    assert loaded == record()
    data = json.loads(open(path).read())
    assert data["kind"] == "ganeti-kvm-runtime" and data["version"] == 1
    assert os.listdir(tmp_path) == ["web1.runtime"]  # no temp file left


def test_missing_record_is_none(tmp_path) -> None:
    assert runtime.load(str(tmp_path / "nothing"), "web1") is None


@pytest.mark.parametrize("content, why", [
    (b'{"kind": "ganeti-kvm-runtime", "vers', "corrupt"),
    (b"\xff\xfe", "corrupt"),
    (b'{"kind": "something-else"}', "kind"),
    (b'{"kind": "ganeti-kvm-runtime", "version": 99, "name": "web1"}', "version 99"),
    (b'{"kind": "ganeti-kvm-runtime", "version": 1, "name": "web2", "argv": ["x"]}',
     "belongs to instance 'web2'"),
    (b'{"kind": "ganeti-kvm-runtime", "version": 1, "name": "web1", "argv": []}', "argv"),
    (b'[1, 2]', "old"),
])
def test_bad_records_name_the_file(tmp_path, content: bytes, why: str) -> None:
    path = tmp_path / "web1.runtime"
    path.write_bytes(content)
    with pytest.raises(errors.RuntimeStateError) as info:
        runtime.load(str(path), "web1")
    assert str(path) in str(info.value) and why in str(info.value)


def test_upgrade_from_the_2011_format(tmp_path) -> None:
    path = tmp_path / "web1.runtime"
    old = [["/usr/bin/kvm", "-name", "web1", "-m", "128"],
           [{"mac": "aa:00:00:00:00:01", "ip": None, "nicparams": {"mode": "bridged",
                                                                   "link": "br0"}}],
           {"acpi": True, "kernel_path": "/boot/vmlinuz"}]
    path.write_text(json.dumps(old))
    loaded = runtime.load(str(path), "web1")
    assert loaded is not None
    assert loaded.argv == old[0] and loaded.nics == old[1] and loaded.hvparams == old[2]
    assert loaded.upgraded_from == 0
    runtime.save(str(path), loaded)
    assert json.loads(path.read_text())["version"] == 1


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "f")
    fsutil.atomic_write(path, "old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        fsutil.atomic_write(path, "new")
    monkeypatch.undo()
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["f"]


def test_dirs_are_private(tmp_path) -> None:
    target = str(tmp_path / "a" / "b")
    fsutil.ensure_dirs([target])
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
