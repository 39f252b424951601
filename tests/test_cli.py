"""The ``ganeti-kvm`` command: spec checks, error reporting, and real instances."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.core.migration import MigrationStatus
from ganeti_kvm.host import process
from ganeti_kvm.hv_kvm import KVMHypervisor
from ganeti_kvm.tools import cli
from tests.helpers import SerialReader, free_port, guest_hvparams, kill_instances

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "instance.json")


def good_spec() -> dict[str, Any]:
    return {"name": "cli1", "memory": 128, "vcpus": 1,
            "disks": [{"path": "/dev/null", "mode": "ro"}],
            "nics": [{"mac": "aa:00:00:00:00:01", "ip": "192.0.2.1", "mode": "routed",
                      "link": "100"}],
            "tags": ["a"], "network_port": None, "hvparams": {"acpi": False}}


def write_spec(directory: str, spec: Any, name: str = "spec.json") -> str:
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(spec, handle)
    return path


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ganeti-kvm: error: ")
    for needle in needles:
        assert needle in lines[0]


# --- spec parsing (no QEMU) ------------------------------------------------------

def test_example_spec_is_valid() -> None:
    with open(EXAMPLE, encoding="utf-8") as handle:
        data = json.load(handle)
    assert "_comment" in data
    instance, block_devices = cli.parse_spec(data)
    assert instance.name == "web1.example.com"
    assert instance.beparams == {"memory": 512, "vcpus": 2}
    assert [(d.mode, p) for d, p in block_devices] == [
        ("rw", "/dev/vg0/web1-root"), ("ro", "/srv/images/tools.img")]
    assert instance.nics[0].nicparams == {"mode": "bridged", "link": "br0"}
    assert instance.hvparams["migration_bandwidth"] == 64  # only what was given
    assert "acpi" not in instance.hvparams


def test_good_spec_builds_the_instance() -> None:
    instance, block_devices = cli.parse_spec(good_spec())
    assert (instance.name, instance.tags, instance.network_port) == ("cli1", ["a"], None)
    assert block_devices[0][0].mode == c.DISK_RDONLY and block_devices[0][1] == "/dev/null"
    nic = instance.nics[0]
    assert (nic.mac, nic.ip, nic.nicparams) == ("aa:00:00:00:00:01", "192.0.2.1",
                                                {"mode": "routed", "link": "100"})


def test_defaults_of_optional_fields() -> None:
    instance, block_devices = cli.parse_spec(
        {"name": "x", "memory": 64, "vcpus": 1, "disks": [{"path": "/d"}],
         "nics": [{"mac": "AA:00:00:00:00:02"}]})
    assert block_devices[0][0].mode == c.DISK_RDWR
    assert instance.nics[0].mac == "aa:00:00:00:00:02"
    assert instance.nics[0].nicparams == {"mode": "bridged", "link": ""}
    assert instance.hvparams == {} and instance.tags == []


def _without(key: str) -> dict[str, Any]:
    spec = good_spec()
    del spec[key]
    return spec


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    spec = good_spec()
    target: Any = spec
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return spec


BAD_SPECS = [
    ("not-object", [1, 2], "JSON object"),
    ("no-name", _without("name"), "'name'"),
    ("bad-name", _with(("name",), "a b"), "'name'"),
    ("no-memory", _without("memory"), "'memory'"),
    ("memory-string", _with(("memory",), "128"), "'memory'"),
    ("memory-zero", _with(("memory",), 0), "'memory'"),
    ("no-vcpus", _without("vcpus"), "'vcpus'"),
    ("vcpus-bool", _with(("vcpus",), True), "'vcpus'"),
    ("disks-object", _with(("disks",), {}), "'disks'"),
    ("disk-no-path", _with(("disks", 0), {"mode": "rw"}), "'disks[0].path'"),
    ("disk-mode", _with(("disks", 0, "mode"), "rx"), "'disks[0].mode'"),
    ("disk-extra", _with(("disks", 0, "size"), 4), "'disks[0]'"),
    ("nic-mac", _with(("nics", 0, "mac"), "zz"), "'nics[0].mac'"),
    ("nic-mode", _with(("nics", 0, "mode"), "nat"), "'nics[0].mode'"),
    ("nic-link", _with(("nics", 0, "link"), 5), "'nics[0].link'"),
    ("nic-ip", _with(("nics", 0, "ip"), 5), "'nics[0].ip'"),
    ("tag", _with(("tags",), ["ok", 3]), "'tags[1]'"),
    ("port", _with(("network_port",), 70000), "'network_port'"),
    ("hvparams-list", _with(("hvparams",), []), "'hvparams'"),
    ("hvparams-unknown", _with(("hvparams", "no_such"), 1), "no_such"),
    ("hvparams-type", _with(("hvparams", "acpi"), "yes"), "acpi"),
    ("unknown-key", _with(("colour",), "red"), "colour"),
]


@pytest.mark.parametrize("spec,needle", [(s, n) for _, s, n in BAD_SPECS],
                         ids=[i for i, _, _ in BAD_SPECS])
def test_bad_spec_is_one_line_naming_the_field(tmp_path, capsys, spec, needle) -> None:
    with pytest.raises(cli.SpecError) as info:
        cli.parse_spec(spec)
    assert needle in str(info.value)
    path = write_spec(str(tmp_path), spec)
    code, out, err = run_main(capsys, "--run-dir", str(tmp_path / "run"), "start", path)
    assert_one_line_error(code, err, needle, path)
    assert out == ""


def test_unreadable_and_invalid_spec_files(tmp_path, capsys) -> None:
    missing = str(tmp_path / "missing.json")
    code, _, err = run_main(capsys, "--run-dir", str(tmp_path), "start", missing)
    assert_one_line_error(code, err, missing, "No such file")
    broken = tmp_path / "broken.json"
    broken.write_text("{\"name\": \n")
    code, _, err = run_main(capsys, "--run-dir", str(tmp_path), "start", str(broken))
    assert_one_line_error(code, err, "not valid JSON")


def test_debug_shows_the_traceback(tmp_path, capsys) -> None:
    path = write_spec(str(tmp_path), _without("memory"))
    code, _, err = run_main(capsys, "--debug", "--run-dir", str(tmp_path), "start", path)
    assert code == 1
    assert "Traceback" in err and "SpecError" in err
    assert err.rstrip().splitlines()[-1].startswith("ganeti-kvm: error: ")


def test_usage_errors_exit_2(tmp_path, capsys) -> None:
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["info"]) == 2
    assert cli.main(["info", "bad/name"]) == 2
    assert cli.main(["stop", "x", "--timeout", "-3"]) == 2
    assert cli.main(["migrate", "x"]) == 2  # --to is required
    assert cli.main(["--help"]) == 0
    capsys.readouterr()


def test_global_options_after_the_command(tmp_path, capsys) -> None:
    code, out, _ = run_main(capsys, "list", "--json", "--run-dir", str(tmp_path))
    assert code == 0 and json.loads(out) == []


def test_empty_node(tmp_path, capsys) -> None:
    run = str(tmp_path / "run")
    code, out, _ = run_main(capsys, "--run-dir", run, "list")
    assert code == 0 and out.split() == ["NAME", "PID", "MEMORY", "VCPUS", "STATE", "CPU"]
    code, _, err = run_main(capsys, "--run-dir", run, "info", "ghost")
    assert_one_line_error(code, err, "ghost", "not running")
    code, _, err = run_main(capsys, "--run-dir", run, "console", "ghost")
    assert_one_line_error(code, err, "ghost", "not running")
    code, _, err = run_main(capsys, "--run-dir", run, "reboot", "ghost")
    assert_one_line_error(code, err, "ghost")
    code, _, err = run_main(capsys, "--run-dir", run, "migrate", "ghost", "--to",
                            str(tmp_path / "b"))
    assert_one_line_error(code, err, "ghost", "not running")
    code, out, _ = run_main(capsys, "--run-dir", run, "cleanup", "ghost")
    assert code == 0 and "cleaned up" in out


def test_verify_reports_problems(tmp_path, capsys) -> None:
    code, _, err = run_main(capsys, "--run-dir", str(tmp_path), "verify", "--kvm-path",
                            str(tmp_path / "no-qemu"))
    assert_one_line_error(code, err, "no-qemu")


# --- migration progress and failure handling (no QEMU) ------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _status(done_mib: int, total_mib: int = 100) -> MigrationStatus:
    mib = 1024 * 1024
    return MigrationStatus(status="active", transferred=done_mib * mib,
                           remaining=(total_mib - done_mib) * mib, total=total_mib * mib)


def test_progress_on_a_terminal_is_one_redrawn_line() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = cli.MigrationProgress(stream, tty=True, clock=clock)
    for done in (0, 10, 30, 50):
        progress(_status(done))
        clock.now += 1.0
    progress.finish()
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    last = text.rstrip("\n").split("\r")[-1]
    assert " 50%" in last and "50.0 MiB/100.0 MiB" in last
    assert "MiB/s" in last and "0:03 left" in last  # 50 MiB at ~17.5 MiB/s
    assert last.startswith("[############............]")


def test_progress_to_a_file_is_throttled_lines() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = cli.MigrationProgress(stream, tty=False, clock=clock)
    for done in range(0, 100, 5):  # 20 samples, 0.25 s apart: 5 s
        progress(_status(done))
        clock.now += 0.25
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert 4 <= len(lines) <= 6, lines
    assert "\r" not in stream.getvalue()
    assert all(line.startswith("migration active: ") for line in lines)
    assert "20.0 MiB/s" in lines[-1] and "left" in lines[-1]


def test_human_units() -> None:
    assert cli.human_bytes(512) == "512 B"
    assert cli.human_bytes(1536) == "1.5 KiB"
    assert cli.human_bytes(3 * 1024 ** 3) == "3.0 GiB"
    assert cli.human_duration(75) == "1:15"
    assert cli.human_duration(3725) == "1:02:05"


def test_failed_migration_finalizes_the_target(tmp_path, capsys, monkeypatch) -> None:
    calls: list[tuple[str, str, Any]] = []

    def record(method: str, result: Any = None, fail: Exception | None = None):
        def fake(self, *args, **kwargs):
            calls.append((method, self.node.layout.root, args[-1] if args else None))
            if fail is not None:
                raise fail
            return result
        return fake

    monkeypatch.setattr(KVMHypervisor, "MigrationInfo", record("info", "{}"))
    monkeypatch.setattr(KVMHypervisor, "AcceptInstance", record("accept"))
    monkeypatch.setattr(KVMHypervisor, "MigrateInstance", record(
        "migrate", fail=errors.MigrationError("Migration of m1 failed; keeps running")))
    monkeypatch.setattr(KVMHypervisor, "FinalizeMigration", record("finalize"))
    source, target = str(tmp_path / "a"), str(tmp_path / "b")
    code, out, err = run_main(capsys, "--run-dir", source, "migrate", "m1", "--to", target)
    assert_one_line_error(code, err, "m1 failed; keeps running")
    assert out == ""
    assert [(m, root) for m, root, _ in calls] == [
        ("info", source), ("accept", target), ("migrate", source), ("finalize", target)]
    assert calls[-1][2] is False  # FinalizeMigration(success=False)


def test_migrate_to_its_own_run_dir_is_refused(tmp_path, capsys) -> None:
    run = str(tmp_path / "a")
    code, _, err = run_main(capsys, "--run-dir", run, "migrate", "m1", "--to", run + "/")
    assert_one_line_error(code, err, "source's own")


# --- real instances ----------------------------------------------------------------

@pytest.fixture
def run_dirs(short_dir: str) -> Iterator[tuple[str, str]]:
    """Two run directories (two nodes); every QEMU in them is killed at teardown."""
    dirs = (os.path.join(short_dir, "a"), os.path.join(short_dir, "b"))
    try:
        yield dirs
    finally:
        for run_dir in dirs:
            kill_instances(run_dir)


def guest_spec(name: str, qemu: str, guest: Any, **hv_overrides: Any) -> dict[str, Any]:
    defaults = c.HVC_DEFAULTS[c.HT_KVM]
    full = guest_hvparams(qemu, guest, **hv_overrides)
    partial = {k: v for k, v in full.items() if defaults.get(k) != v}  # as an operator writes
    return {"_comment": "test", "name": name, "memory": 128, "vcpus": 1,
            "hvparams": partial}


def test_start_list_info_console_stop(run_dirs, short_dir, qemu_bin, guest, capsys,
                                      monkeypatch) -> None:
    run, _ = run_dirs
    spec = write_spec(short_dir, guest_spec("cli1", qemu_bin, guest))
    code, out, err = run_main(capsys, "--run-dir", run, "start", spec, "--paused")
    assert code == 0, err
    assert "cli1 started (paused)" in out

    code, out, _ = run_main(capsys, "--run-dir", run, "list")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "PID", "MEMORY", "VCPUS", "STATE", "CPU"]
    assert row.split()[0] == "cli1" and row.split()[2:5] == ["128", "1", "paused"]

    code, out, _ = run_main(capsys, "--run-dir", run, "list", "--json")
    listed = json.loads(out)
    assert [set(item) for item in listed] == [
        {"name", "pid", "memory", "vcpus", "state", "cpu_time"}]
    assert listed[0]["name"] == "cli1" and listed[0]["state"] == "paused"

    code, out, _ = run_main(capsys, "--run-dir", run, "info", "cli1")
    assert code == 0
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    assert fields["state"] == "paused" and fields["pid"] == str(listed[0]["pid"])
    assert fields["kvm_path"] == qemu_bin
    code, out, _ = run_main(capsys, "--run-dir", run, "info", "cli1", "--json")
    assert json.loads(out)["memory"] == 128

    executed: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: executed.append((path, argv)))
    with pytest.raises(AssertionError, match="unreachable"):
        cli.cmd_console(cli.build_parser().parse_args(["--run-dir", run, "console", "cli1"]))
    assert executed and executed[0][0] == c.KVM_CONSOLE_WRAPPER
    assert "cli1" in executed[0][1] and any(run in part for part in executed[0][1])

    code, _, err = run_main(capsys, "--run-dir", run, "start", spec)
    assert_one_line_error(code, err, "already running")

    code, out, err = run_main(capsys, "--run-dir", run, "stop", "cli1", "--force")
    assert code == 0, err
    assert "cli1 stopped" in out
    code, out, _ = run_main(capsys, "--run-dir", run, "list", "--json")
    assert json.loads(out) == []


def _command(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop(c.RUN_DIR_ENV, None)
    return subprocess.run([sys.executable, "-m", "ganeti_kvm", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180, check=False)


def test_subprocess_start_error_and_lifecycle(run_dirs, short_dir, qemu72, guest) -> None:
    run, _ = run_dirs
    bad = guest_spec("cli2", qemu72, guest, kernel_path=os.path.join(short_dir, "no-kernel"))
    result = _command("--run-dir", run, "start", write_spec(short_dir, bad, "bad.json"))
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert_one_line_error(result.returncode, result.stderr, "no-kernel")

    good = write_spec(short_dir, guest_spec("cli2", qemu72, guest), "good.json")
    result = _command("--run-dir", run, "start", "--paused", good)
    assert result.returncode == 0, result.stderr
    result = _command("--run-dir", run, "list", "--json")
    assert result.returncode == 0, result.stderr
    assert [(i["name"], i["state"]) for i in json.loads(result.stdout)] == [("cli2", "paused")]
    result = _command("--run-dir", run, "stop", "cli2", "--force")
    assert result.returncode == 0, result.stderr
    assert json.loads(_command("--run-dir", run, "list", "--json").stdout) == []


def test_stop_by_power_button_and_by_force_after_timeout(run_dirs, short_dir, qemu72,
                                                        guest) -> None:
    """``stop`` presses the ACPI button; a guest that ignores it is forced after --timeout."""
    run, _ = run_dirs
    node = KVMHypervisor(run_dir=run).node
    spec = write_spec(short_dir, guest_spec("cli4", qemu72, guest), "acpi.json")
    result = _command("--run-dir", run, "start", spec)
    assert result.returncode == 0, result.stderr
    serial = SerialReader(node.paths("cli4").serial_socket)
    try:
        serial.read_until("READY")
        result = _command("--run-dir", run, "stop", "cli4", "--timeout", "60")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "Instance cli4 stopped\n"
        assert result.stderr == ""  # powered off by itself: nothing was forced
        serial.read_until("POWER BUTTON")  # the guest heard the button
    finally:
        serial.close()
    assert node.list_names() == []

    # A guest paused after it ran cannot act on the button: the timeout ends it by signal.
    result = _command("--run-dir", run, "start", spec)
    assert result.returncode == 0, result.stderr
    pid = node.running_pid("cli4")
    node.qmp("cli4", "stop")
    result = _command("--run-dir", run, "stop", "cli4", "--timeout", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Instance cli4 stopped\n"
    assert "cli4 did not power off within 1.0 s; terminating it" in result.stderr
    assert pid is not None and not process.is_alive(pid)
    assert node.list_names() == []

    # A guest that never ran (started paused) has no OS to hear it: ended at once.
    result = _command("--run-dir", run, "start", "--paused", spec)
    assert result.returncode == 0, result.stderr
    pid = node.running_pid("cli4")
    result = _command("--run-dir", run, "stop", "cli4", "--timeout", "600")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Instance cli4 stopped\n"
    assert "did not power off" not in result.stderr
    assert pid is not None and not process.is_alive(pid)
    assert node.list_names() == []


def test_migrate_between_run_dirs(run_dirs, short_dir, qemu_bin, guest, capsys) -> None:
    source, target = run_dirs
    spec = guest_spec("cli3", qemu_bin, guest, migration_port=free_port(),
                      migration_bandwidth=1000)
    code, _, err = run_main(capsys, "--run-dir", source, "start",
                            write_spec(short_dir, spec))
    assert code == 0, err
    code, out, err = run_main(capsys, "--run-dir", source, "migrate", "cli3", "--to", target,
                              "--address", "127.0.0.1", "--timeout", "120")
    assert code == 0, err
    assert f"cli3 migrated to {target}" in out
    assert "\r" not in err  # not a terminal: plain lines
    assert all(line.startswith("migration ") for line in err.splitlines()), err

    code, out, _ = run_main(capsys, "--run-dir", target, "list", "--json")
    assert [(i["name"], i["state"]) for i in json.loads(out)] == [("cli3", "running")]
    code, out, _ = run_main(capsys, "--run-dir", source, "list", "--json")
    assert json.loads(out) == []
