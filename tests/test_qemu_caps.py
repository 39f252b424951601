"""Tests for ganeti_kvm.qemu.caps: the help-text parsers, the caches and real probes.

The fixtures under tests/data/qemu-<version>/ are the verbatim outputs of
the real QEMU 7.2 and 10.0 binaries; regenerate them with e.g.
``qemu-system-x86_64 -device help > tests/data/qemu-7.2/device-help.txt``.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ganeti_kvm import errors
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qemu.caps import QemuCaps

DATA = Path(__file__).parent / "data"
VERSIONS = ("7.2", "10.0")
FILES = {"version": "version.txt", "help": "help.txt", "machine": "machine-help.txt",
         "device": "device-help.txt", "accel": "accel-help.txt", "netdev": "netdev-help.txt",
         "cpu": "cpu-definitions.txt"}
ARGS_TO_FILE = {" ".join(args): FILES[name] for name, args in qemu_caps.PROBE_COMMANDS.items()}

COMMON_OPTIONS = {"rtc", "netdev", "display", "daemonize", "nodefaults", "mem-path",
                  "mem-prealloc", "enable-kvm", "vnc", "object", "incoming", "usbdevice",
                  "machine", "device", "chardev", "qmp", "pidfile", "m", "smp", "help", "h"}
COMMON_DEVICES = {"virtio-net-pci", "e1000", "usb-tablet", "virtio-blk-pci", "ide-hd",
                  "scsi-hd", "lsi53c895a", "usb-mouse", "qemu-xhci", "piix3-usb-uhci",
                  "rtl8139", "virtio-scsi-pci", "scsi-cd", "ide-cd", "virtio-net"}


def read(version: str, name: str) -> str:
    return (DATA / f"qemu-{version}" / FILES[name]).read_text(encoding="utf-8")


def outputs(version: str) -> dict[str, str]:
    return {name: read(version, name) for name in FILES}


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    qemu_caps.clear_cache()
    yield
    qemu_caps.clear_cache()


# --- parsers against the real help texts ------------------------------------------------------


@pytest.mark.parametrize("version, expected", [("7.2", (7, 2, 22)), ("10.0", (10, 0, 2))])
def test_parse_version_fixtures(version: str, expected: tuple[int, int, int]) -> None:
    assert qemu_caps.parse_version(read(version, "version")) == expected
    assert qemu_caps.parse_version(read(version, "help")) == expected
    assert qemu_caps.version_line(read(version, "version")).startswith(
        f"QEMU emulator version {'.'.join(map(str, expected))} (Debian")


@pytest.mark.parametrize("text, expected", [
    ("QEMU emulator version 10.1.50 (v10.1.0-1234-gdeadbeef)\r\n", (10, 1, 50)),
    ("QEMU PC emulator version 0.12.1 (qemu-kvm-0.12.1.2), Copyright", (0, 12, 1)),
    ("QEMU emulator version 9.2\n", (9, 2, 0)),
])
def test_parse_version_variants(text: str, expected: tuple[int, int, int]) -> None:
    assert qemu_caps.parse_version(text) == expected


def test_parse_version_garbage() -> None:
    with pytest.raises(ValueError, match="No QEMU version"):
        qemu_caps.parse_version("Segmentation fault\n")


def test_help_options_72() -> None:
    options = qemu_caps.parse_help_options(read("7.2", "help"))
    assert options >= COMMON_OPTIONS
    assert {"runas", "chroot", "no-acpi", "async-teardown", "no-hpet"} <= options
    assert not {"run-with", "localtime", "balloon"} & options
    assert {"fda", "fdb", "hda", "hdb", "hdc", "hdd"} <= options  # "-fda/-fdb file"
    assert qemu_caps.parse_run_with_keys(read("7.2", "help")) == frozenset()


def test_help_options_100() -> None:
    options = qemu_caps.parse_help_options(read("10.0", "help"))
    assert options >= COMMON_OPTIONS
    assert "run-with" in options
    assert not {"runas", "chroot", "no-acpi", "localtime", "balloon", "no-hpet",
                "async-teardown"} & options
    assert qemu_caps.parse_run_with_keys(read("10.0", "help")) == {
        "async-teardown", "chroot", "user"}


@pytest.mark.parametrize("version", VERSIONS)
def test_help_options_are_names_only(version: str) -> None:
    options = qemu_caps.parse_help_options(read(version, "help"))
    assert all(name and not name.startswith("-") and " " not in name for name in options)
    # prose and wrapped lines never become options
    assert not {"ctrl-alt-f", "usage", "nographic,", "name guest", "Note"} & options
    assert not any(name.endswith(":") for name in options)


@pytest.mark.parametrize("version", VERSIONS)
def test_tap_vhost_and_netdevs(version: str) -> None:
    assert qemu_caps.parse_tap_vhost(read(version, "help"))
    assert {"vhost", "vhostfd", "vhostforce", "ifname", "fd", "queues", "vnet_hdr"} <= \
        qemu_caps.parse_option_keys(read(version, "help"), "netdev", kind="tap")
    # keys of other -netdev kinds do not leak into tap
    assert "hostfwd" not in qemu_caps.parse_option_keys(read(version, "help"), "-netdev", "tap")
    assert {"tap", "user", "bridge", "socket", "vhost-user"} <= \
        qemu_caps.parse_netdevs(read(version, "netdev"))
    assert not any(":" in n for n in qemu_caps.parse_netdevs(read(version, "netdev")))


@pytest.mark.parametrize("version", VERSIONS)
def test_machines(version: str) -> None:
    text = read(version, "machine")
    machines = qemu_caps.parse_machines(text)
    assert {"pc", "q35", "none", "microvm", f"pc-i440fx-{version}", f"pc-q35-{version}",
            "isapc"} <= machines
    assert "Supported" not in machines
    assert qemu_caps.parse_default_machine(text) == f"pc-i440fx-{version}"
    aliases = dict(qemu_caps.parse_machine_aliases(text))
    assert aliases == {"pc": f"pc-i440fx-{version}", "q35": f"pc-q35-{version}"}


@pytest.mark.parametrize("version", VERSIONS)
def test_devices(version: str) -> None:
    devices = qemu_caps.parse_devices(read(version, "device"))
    assert devices >= COMMON_DEVICES
    assert len(devices) > 300
    assert not any('"' in d or " " in d for d in devices)


@pytest.mark.parametrize("version", VERSIONS)
def test_accels(version: str) -> None:
    assert qemu_caps.parse_accels(read(version, "accel")) == {"kvm", "tcg"}


@pytest.mark.parametrize("version", VERSIONS)
def test_build_caps_named_questions(version: str) -> None:
    caps = qemu_caps.build_caps("/usr/bin/qemu", outputs(version))
    new = version == "10.0"
    assert caps.has_run_with is new
    assert caps.has_run_with_user is new
    assert caps.has_run_with_chroot is new
    assert caps.has_runas is not new
    assert caps.has_chroot is not new
    assert caps.has_no_acpi is not new
    assert caps.has_rtc and caps.has_netdev and caps.has_display and caps.has_usbdevice
    assert not caps.has_localtime
    assert caps.has_option("daemonize") and caps.has_option("-daemonize")
    assert not caps.has_option("balloon")
    assert caps.has_device("virtio-net-pci") and not caps.has_device("no-such-nic")
    assert caps.has_machine("pc") and caps.has_machine("q35")
    assert caps.has_accel("kvm") and caps.has_accel("tcg") and not caps.has_accel("hvf")
    assert caps.has_netdev_backend("tap") and caps.tap_vhost
    assert caps.resolve_machine("pc") == f"pc-i440fx-{version}"
    assert caps.resolve_machine("pc-q35-8.0") == "pc-q35-8.0"
    assert caps.version_text.startswith("QEMU emulator version")


@pytest.mark.parametrize("version", VERSIONS)
def test_the_pinned_machine_type_and_what_a_binary_lacks(version: str) -> None:
    caps = qemu_caps.build_caps("/usr/bin/qemu", outputs(version))
    assert caps.pinned_machine() == f"pc-i440fx-{version}"
    assert caps.pinned_machine("q35") == f"pc-q35-{version}"
    assert caps.pinned_machine("microvm") is None  # not an alias: nothing to pin
    assert caps.missing_machine("pc-i440fx-7.2") is None  # 10.0 still has 7.2's type
    reason = caps.missing_machine("pc-i440fx-11.0")
    assert reason == (f"QEMU /usr/bin/qemu (version {'.'.join(map(str, caps.version))}) has "
                      f"no machine type pc-i440fx-11.0 (its newest pc-i440fx-* type is "
                      f"pc-i440fx-{version})")


def test_a_7_2_binary_lacks_the_10_0_type() -> None:
    caps = qemu_caps.build_caps("/usr/bin/qemu", outputs("7.2"))
    assert "no machine type pc-i440fx-10.0" in (caps.missing_machine("pc-i440fx-10.0") or "")
    assert caps.missing_machine("virt") == \
        "QEMU /usr/bin/qemu (version 7.2.22) has no machine type virt"


def test_a_binary_without_a_pc_alias_pins_nothing() -> None:
    caps = QemuCaps(path="/q", version=(7, 2, 0), version_text="", options=frozenset(),
                    machines=frozenset(["pc-i440fx-7.2"]))
    assert caps.pinned_machine() is None


@pytest.mark.parametrize("answer, machine", [
    ("pc-i440fx-7.2-machine", "pc-i440fx-7.2"), ("pc-q35-10.0-machine", "pc-q35-10.0"),
    ("pc-i440fx-7.2", None), ("x,y-machine", None), (None, None), (7, None), ("-machine", None),
])
def test_machine_from_qom_type(answer: object, machine: str | None) -> None:
    assert qemu_caps.machine_from_qom_type(answer) == machine


@pytest.mark.parametrize("name, ok", [
    ("pc-i440fx-7.2", True), ("pc", True), ("pc,accel=kvm", False), ("pc=1", False),
    ("", False), ("-pc", False), ("pc i440fx", False), ("pc\n", False), (None, False),
])
def test_is_machine_name(name: object, ok: bool) -> None:
    assert qemu_caps.is_machine_name(name) is ok


def test_machine_of_version() -> None:
    assert qemu_caps.machine_of_version([7, 2, 22]) == "pc-i440fx-7.2"
    assert qemu_caps.machine_of_version((10, 0, 2)) == "pc-i440fx-10.0"
    assert qemu_caps.machine_of_version([]) is None
    assert qemu_caps.machine_of_version([7, 2, 22], "q35") is None


# --- parsers against hand-written variants ------------------------------------------------------

WRAPPED_HELP = """\
QEMU emulator version 10.2.0
usage: qemu-system-x86_64 [options] [disk_image]

Standard options:
-h or -help     display this help and exit
-machine [type=]name[,prop[=value][,...]]
                selects emulated machine ('-machine help' for list)
-smp [[cpus=]n][,maxcpus=maxcpus][,drawers=drawers][,books=books][,sockets=sockets]
               [,dies=dies][,clusters=clusters][,modules=modules][,cores=cores]
               [,threads=threads]

Debug/Expert options:
-msg [timestamp[=on|off]][,guest-name=[on|off]]
                guest-name=on enables guest name prefix but only if
                -name guest option is set (default: off)
\t-notanoption  a tab-indented line is a continuation too
-run-with [async-teardown=on|off][,chroot=dir][,exit-with-parent=on|off]
                [user=username|uid:gid]
                Set miscellaneous QEMU process lifecycle options:
                async-teardown=on enables asynchronous teardown (Linux only)
                chroot=dir chroot to dir just before starting the VM
                user=username switch to the specified user before starting the VM
-netdev tap,id=str[,fd=h][,fds=x:y:...:z][,ifname=name]
         [,vhost=on|off][,vhostfd=h]
                configure a host TAP network backend with ID 'str'
-netdev user,id=str[,ipv4=on|off]
-nodefaults     don't create default devices

Frobnicator options (new in some future QEMU):
-frobnicate [level=n]
                frobnicate the guest
  -indented-option  also not an option
Some prose that is not indented
    and its continuation
-daemonize      daemonize QEMU after initializing
"""


def test_wrapped_help_lines() -> None:
    options = qemu_caps.parse_help_options(WRAPPED_HELP)
    assert options == {"h", "help", "machine", "smp", "msg", "run-with", "netdev",
                       "nodefaults", "frobnicate", "daemonize"}
    assert qemu_caps.parse_run_with_keys(WRAPPED_HELP) == {
        "async-teardown", "chroot", "exit-with-parent", "user"}
    assert qemu_caps.parse_tap_vhost(WRAPPED_HELP)
    smp = qemu_caps.parse_option_keys(WRAPPED_HELP, "smp")
    assert {"cpus", "maxcpus", "threads", "modules", "cores"} <= smp
    entries = {e.name: e for e in qemu_caps.parse_help_entries(WRAPPED_HELP)}
    assert entries["run-with"].synopsis.endswith("[user=username|uid:gid]")
    assert entries["run-with"].description[0] == "Set miscellaneous QEMU process lifecycle options:"
    assert entries["h"].names == ("h", "help")


def test_crlf_and_trailing_spaces() -> None:
    text = WRAPPED_HELP.replace("\n", "  \r\n")
    assert qemu_caps.parse_help_options(text) == qemu_caps.parse_help_options(WRAPPED_HELP)
    assert qemu_caps.parse_run_with_keys(text) == qemu_caps.parse_run_with_keys(WRAPPED_HELP)
    assert qemu_caps.parse_accels("Accelerators supported in QEMU binary:\r\ntcg \r\nkvm\r\n") \
        == {"kvm", "tcg"}
    assert qemu_caps.parse_machines("Supported machines are:\r\npc   Standard PC (alias of "
                                    "pc-i440fx-9.2)\r\nnone  empty machine \r\n") == {"pc", "none"}
    assert qemu_caps.parse_devices('Network devices:\r\nname "e1000", bus PCI, alias '
                                   '"e1000-82540em"  \r\n') == {"e1000", "e1000-82540em"}
    for name in FILES:
        crlf = read("10.0", name).replace("\n", "\r\n")
        plain = read("10.0", name)
        for parser in (qemu_caps.parse_help_options, qemu_caps.parse_devices,
                       qemu_caps.parse_machines):
            assert parser(crlf) == parser(plain)


def test_run_with_missing_comma_and_no_run_with() -> None:
    text = "-run-with [async-teardown=on|off][,chroot=dir][user=username|uid:gid]\n"
    assert qemu_caps.parse_run_with_keys(text) == {"async-teardown", "chroot", "user"}
    assert qemu_caps.parse_run_with_keys("-runas user     change user\n") == frozenset()
    assert qemu_caps.parse_run_with_keys("") == frozenset()


def test_empty_outputs() -> None:
    assert qemu_caps.parse_help_options("") == frozenset()
    assert qemu_caps.parse_devices("") == frozenset()
    assert qemu_caps.parse_machines("") == frozenset()
    assert qemu_caps.parse_default_machine("") is None
    assert qemu_caps.parse_accels("") == frozenset()


# --- serialisation -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_dict_round_trip(version: str) -> None:
    caps = qemu_caps.build_caps("/usr/bin/qemu", outputs(version))
    data = json.loads(json.dumps(caps.to_dict()))
    assert QemuCaps.from_dict(data) == caps
    assert data["options"] == sorted(data["options"])


@pytest.mark.parametrize("damage", [
    lambda d: d.pop("options"),
    lambda d: d.update(version=[10, 0]),
    lambda d: d.update(version="10.0.2"),
    lambda d: d.update(devices="virtio-net-pci"),
    lambda d: d.update(tap_vhost="yes"),
    lambda d: d.update(path=None),
    lambda d: d.update(machine_aliases=[["pc"]]),
])
def test_from_dict_rejects_damage(damage: Callable[[dict[str, Any]], object]) -> None:
    data = qemu_caps.build_caps("/q", outputs("7.2")).to_dict()
    damage(data)
    with pytest.raises(ValueError):
        QemuCaps.from_dict(data)


# --- probing a fully controlled fake binary --------------------------------------------------


def make_fake_qemu(directory: Path, version: str = "10.0", log: Path | None = None,
                   extra: str = "") -> Path:
    """A shell script that answers the probe commands with the saved help texts."""
    fixtures = DATA / f"qemu-{version}"
    log = log or directory / "calls.log"
    cases = "\n".join(f'  {shlex.quote(args)}) exec cat {shlex.quote(str(fixtures / name))} ;;'
                      for args, name in ARGS_TO_FILE.items())
    script = directory / "qemu-fake"
    script.write_text(f"""#!/bin/sh
echo "$*" >> {shlex.quote(str(log))}
{extra}
case "$*" in
{cases}
  *) echo "qemu-fake: unexpected arguments $*" >&2; exit 1 ;;
esac
""", encoding="ascii")
    script.chmod(0o755)
    return script


def calls(directory: Path) -> list[str]:
    log = directory / "calls.log"
    return log.read_text(encoding="ascii").splitlines() if log.exists() else []


class PopenCounter:
    """Wraps subprocess.Popen to count (and optionally forbid) probe processes."""

    def __init__(self, forbid: bool = False) -> None:
        self.count = 0
        self.forbid = forbid
        self.real = subprocess.Popen

    def __call__(self, *args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:  # noqa: ANN401
        self.count += 1
        if self.forbid:
            raise AssertionError(f"unexpected process {args!r}")
        return self.real(*args, **kwargs)


@pytest.fixture
def popen(monkeypatch: pytest.MonkeyPatch) -> PopenCounter:
    counter = PopenCounter()
    monkeypatch.setattr(subprocess, "Popen", counter)  # the module qemu_caps calls through
    return counter


def test_probe_fake_binary(tmp_path: Path, popen: PopenCounter) -> None:
    script = make_fake_qemu(tmp_path)
    caps = qemu_caps.probe(str(script))
    assert caps == qemu_caps.build_caps(str(script), outputs("10.0"))
    assert caps.path == str(script)
    assert popen.count == qemu_caps.PROBE_PROCESSES
    aio = [" ".join(qemu_caps.aio_probe_argv(str(script), mode)[1:])
           for mode in qemu_caps.PROBED_AIO_MODES]
    spice = " ".join(qemu_caps.spice_probe_argv(str(script))[1:])
    assert sorted(calls(tmp_path)) == sorted([*ARGS_TO_FILE, *aio, spice])
    assert caps.aio_modes == frozenset()  # the fake refuses the aio probe: no io_uring
    assert not caps.has_spice  # and the SPICE probe: no SPICE
    # the second call runs no process at all
    popen.forbid = True
    assert qemu_caps.probe(str(script)) is caps
    assert popen.count == qemu_caps.PROBE_PROCESSES + 0


def test_probe_through_symlink_shares_entry(tmp_path: Path, popen: PopenCounter) -> None:
    script = make_fake_qemu(tmp_path)
    link = tmp_path / "kvm"
    link.symlink_to(script.name)
    first = qemu_caps.probe(str(script))
    popen.forbid = True
    via_link = qemu_caps.probe(str(link))
    assert via_link.path == str(link)
    assert via_link.options == first.options


def test_probe_mtime_change_invalidates(tmp_path: Path, popen: PopenCounter) -> None:
    script = make_fake_qemu(tmp_path, version="7.2")
    assert qemu_caps.probe(str(script)).has_runas
    st = script.stat()
    # "upgrade": same path, other content, new mtime
    make_fake_qemu(tmp_path, version="10.0")
    os.utime(script, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    caps = qemu_caps.probe(str(script))
    assert caps.has_run_with_user and not caps.has_runas
    assert popen.count == 2 * qemu_caps.PROBE_PROCESSES


def test_probe_runs_commands_concurrently(tmp_path: Path) -> None:
    script = make_fake_qemu(tmp_path, extra="sleep 0.5")
    started = time.monotonic()
    qemu_caps.probe(str(script))
    elapsed = time.monotonic() - started
    # sequentially this would take >= 6 * 0.5 s
    assert elapsed < 0.5 * len(qemu_caps.PROBE_COMMANDS) - 0.5


def test_probe_threads_share_one_probe(tmp_path: Path, popen: PopenCounter) -> None:
    script = make_fake_qemu(tmp_path, extra="sleep 0.2")
    results: list[QemuCaps] = []
    threads = [threading.Thread(target=lambda: results.append(qemu_caps.probe(str(script))))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and all(r == results[0] for r in results)
    assert popen.count == qemu_caps.PROBE_PROCESSES


# --- the disk cache ------------------------------------------------------------------------


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob(qemu_caps.CACHE_PREFIX + "*"))


def test_disk_cache_shared_between_processes(tmp_path: Path, popen: PopenCounter) -> None:
    script = make_fake_qemu(tmp_path)
    cache_dir = tmp_path / "cache"
    caps = qemu_caps.probe(str(script), cache_dir=str(cache_dir))
    (cache_file,) = cache_files(cache_dir)
    assert stat.S_IMODE(cache_file.stat().st_mode) == 0o600
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temp left
    document = json.loads(cache_file.read_text(encoding="utf-8"))
    assert document["kind"] == qemu_caps.CACHE_KIND
    assert document["key"]["realpath"] == os.path.realpath(script)
    # "another process": empty in-process cache, no subprocess allowed
    qemu_caps.clear_cache()
    popen.forbid = True
    assert qemu_caps.probe(str(script), cache_dir=str(cache_dir)) == caps
    assert len(calls(tmp_path)) == qemu_caps.PROBE_PROCESSES


@pytest.mark.parametrize("garbage", [
    "{not json", "", "[]", '{"kind": "something-else"}', "\x00\x01",
    json.dumps({"kind": qemu_caps.CACHE_KIND, "format": qemu_caps.CACHE_FORMAT,
                "key": "wrong", "caps": {}}),
])
def test_corrupt_disk_cache_is_rewritten(tmp_path: Path, popen: PopenCounter,
                                         garbage: str) -> None:
    script = make_fake_qemu(tmp_path)
    cache_dir = tmp_path / "cache"
    expected = qemu_caps.probe(str(script), cache_dir=str(cache_dir))
    (cache_file,) = cache_files(cache_dir)
    cache_file.write_text(garbage, encoding="utf-8")
    qemu_caps.clear_cache()
    assert qemu_caps.probe(str(script), cache_dir=str(cache_dir)) == expected
    assert popen.count == 2 * qemu_caps.PROBE_PROCESSES
    assert json.loads(cache_file.read_text(encoding="utf-8"))["caps"] == expected.to_dict()


def test_damaged_caps_in_disk_cache(tmp_path: Path, popen: PopenCounter) -> None:
    script = make_fake_qemu(tmp_path)
    cache_dir = tmp_path / "cache"
    qemu_caps.probe(str(script), cache_dir=str(cache_dir))
    (cache_file,) = cache_files(cache_dir)
    document = json.loads(cache_file.read_text(encoding="utf-8"))
    del document["caps"]["options"]
    cache_file.write_text(json.dumps(document), encoding="utf-8")
    qemu_caps.clear_cache()
    assert qemu_caps.probe(str(script), cache_dir=str(cache_dir)).has_run_with
    assert popen.count == 2 * qemu_caps.PROBE_PROCESSES


def test_disk_cache_stale_after_upgrade(tmp_path: Path, popen: PopenCounter) -> None:
    script = make_fake_qemu(tmp_path, version="7.2")
    cache_dir = tmp_path / "cache"
    assert qemu_caps.probe(str(script), cache_dir=str(cache_dir)).version == (7, 2, 22)
    st = script.stat()
    make_fake_qemu(tmp_path, version="10.0")
    os.utime(script, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    qemu_caps.clear_cache()
    assert qemu_caps.probe(str(script), cache_dir=str(cache_dir)).version == (10, 0, 2)
    assert len(cache_files(cache_dir)) == 1  # overwritten, not piled up
    assert popen.count == 2 * qemu_caps.PROBE_PROCESSES


def test_unwritable_cache_dir_still_probes(tmp_path: Path) -> None:
    script = make_fake_qemu(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="ascii")
    caps = qemu_caps.probe(str(script), cache_dir=str(blocker / "cache"))
    assert caps.has_run_with


# --- failures ------------------------------------------------------------------------------------


def test_missing_binary(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-qemu"
    with pytest.raises(errors.HypervisorError, match=f"Cannot probe QEMU binary {missing}"):
        qemu_caps.probe(str(missing))


def test_not_executable(tmp_path: Path) -> None:
    script = make_fake_qemu(tmp_path)
    script.chmod(0o644)
    with pytest.raises(errors.HypervisorError, match=str(script)):
        qemu_caps.probe(str(script))


def test_failing_binary(tmp_path: Path) -> None:
    script = make_fake_qemu(tmp_path, extra='case "$*" in "-device help") '
                            'echo "module ui-opengl.so: undefined symbol" >&2; exit 134;; esac')
    with pytest.raises(errors.HypervisorError) as info:
        qemu_caps.probe(str(script))
    message = str(info.value)
    assert str(script) in message
    assert "-device help" in message
    assert "status 134" in message
    assert "undefined symbol" in message
    # a failed probe is not cached: fixing the binary helps at once
    make_fake_qemu(tmp_path)
    assert qemu_caps.probe(str(script)).has_run_with


def test_binary_without_version(tmp_path: Path) -> None:
    script = tmp_path / "not-qemu"
    script.write_text("#!/bin/sh\necho hello\n", encoding="ascii")
    script.chmod(0o755)
    with pytest.raises(errors.HypervisorError, match="printed no version"):
        qemu_caps.probe(str(script))


def test_probe_timeout(tmp_path: Path) -> None:
    script = make_fake_qemu(tmp_path, extra='[ "$1" = -help ] && exec sleep 30')
    started = time.monotonic()
    with pytest.raises(errors.HypervisorError, match=r"-help' did not finish within 0.5 s"):
        qemu_caps.probe(str(script), timeout=0.5)
    assert time.monotonic() - started < 5


# --- real binaries ----------------------------------------------------------------------------


def test_real_probe(qemu_bin: str, tmp_path: Path, popen: PopenCounter) -> None:
    started = time.monotonic()
    caps = qemu_caps.probe(qemu_bin, cache_dir=str(tmp_path))
    uncached = time.monotonic() - started
    started = time.monotonic()
    again = qemu_caps.probe(qemu_bin, cache_dir=str(tmp_path))
    cached = time.monotonic() - started
    qemu_caps.clear_cache()
    started = time.monotonic()
    from_disk = qemu_caps.probe(qemu_bin, cache_dir=str(tmp_path))
    disk = time.monotonic() - started
    print(f"\n{qemu_bin}: QEMU {caps.version}, uncached probe {uncached * 1000:.1f} ms, "
          f"in-process cached {cached * 1e6:.1f} us, disk cached {disk * 1000:.2f} ms")
    assert again is caps and from_disk == caps
    assert popen.count == qemu_caps.PROBE_PROCESSES
    assert caps.path == qemu_bin
    assert caps.options >= COMMON_OPTIONS
    assert caps.devices >= COMMON_DEVICES
    assert caps.has_accel("kvm") and caps.has_accel("tcg")
    assert caps.has_machine("pc") and caps.has_machine("q35")
    assert caps.tap_vhost and caps.has_netdev_backend("tap")
    assert not caps.has_localtime and not caps.has_option("balloon")
    if caps.version >= (9, 1, 0):
        assert caps.has_run_with_user and caps.has_run_with_chroot
        assert not (caps.has_runas or caps.has_chroot or caps.has_no_acpi)
    else:
        assert caps.has_runas and caps.has_chroot and caps.has_no_acpi
        assert not caps.has_run_with
    assert uncached < 10
    assert cached < 0.01
