"""The ifup hook: its environment, how it is run, and the shipped kvm-ifup.

Everything network-related runs inside a throw-away namespace: the bridge is
made there, TAP devices are opened straight inside it, and the hook runs
there through ``run_ifup(..., netns=...)``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.host import ifup, netdev
from tests.netns import netns, ns_ip, ns_read, skip_unless_netns


@dataclass
class Nic:
    """The attributes nic_environment reads."""

    mac: str = "aa:00:00:12:34:56"
    ip: str | None = None
    nicparams: dict[str, Any] = field(default_factory=dict)


def bridged(link: str = "gkbr0", **kwargs: Any) -> Nic:
    return Nic(nicparams={c.NIC_MODE: c.NIC_MODE_BRIDGED, c.NIC_LINK: link}, **kwargs)


def routed(link: str = "", **kwargs: Any) -> Nic:
    return Nic(nicparams={c.NIC_MODE: c.NIC_MODE_ROUTED, c.NIC_LINK: link}, **kwargs)


# --- nic_environment (pure) ----------------------------------------------------

def test_environment_bridged() -> None:
    env = ifup.nic_environment("inst1.example.com", bridged(ip="192.0.2.5"), 2,
                               "gnt.tap7", ["a", "b:c"])
    assert env == {
        "INSTANCE": "inst1.example.com",
        "MAC": "aa:00:00:12:34:56",
        "MODE": "bridged",
        "INTERFACE": "gnt.tap7",
        "INTERFACE_INDEX": "2",
        "TAGS": "a b:c",
        "IP": "192.0.2.5",
        "LINK": "gkbr0",
        "BRIDGE": "gkbr0",
    }


def test_environment_routed_minimal() -> None:
    env = ifup.nic_environment("i", routed(), 0, "gnt.tap0", [])
    assert env == {"INSTANCE": "i", "MAC": "aa:00:00:12:34:56", "MODE": "routed",
                   "INTERFACE": "gnt.tap0", "INTERFACE_INDEX": "0", "TAGS": ""}


def test_environment_routed_with_table() -> None:
    env = ifup.nic_environment("i", routed("100", ip="192.0.2.9"), 1, "t", ("x",))
    assert env["LINK"] == "100" and env["IP"] == "192.0.2.9"
    assert "BRIDGE" not in env


def test_environment_bridged_without_link_keeps_empty_bridge() -> None:
    env = ifup.nic_environment("i", bridged(""), 0, "t", [])
    assert env["BRIDGE"] == "" and "LINK" not in env


def test_environment_rejects_nul_and_missing_fields() -> None:
    with pytest.raises(errors.HypervisorError, match="NUL"):
        ifup.nic_environment("i", bridged(), 0, "t", ["a\0b"])
    with pytest.raises(errors.HypervisorError, match="no MAC"):
        ifup.nic_environment("i", bridged(mac=""), 0, "t", [])
    with pytest.raises(errors.HypervisorError, match="no mode"):
        ifup.nic_environment("i", Nic(nicparams={}), 0, "t", [])


# --- run_ifup with test hooks --------------------------------------------------

def write_hook(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


NASTY_NAME = "x;touch {d}/owned-name"
NASTY_TAGS = ["$(touch {d}/owned-tag)", "`touch {d}/owned-bq`", "a'b\"c", "*", "-rf"]


def test_hook_gets_exactly_the_environment(tmp_path: Path) -> None:
    out = tmp_path / "env.out"
    hook = write_hook(tmp_path / "dump", f"exec /usr/bin/env -0 > '{out}'\n")
    name = NASTY_NAME.format(d=tmp_path)
    tags = [t.format(d=tmp_path) for t in NASTY_TAGS]
    env = ifup.nic_environment(name, bridged(ip="192.0.2.5"), 0, "gnt.tap3", tags)
    ifup.run_ifup(hook, env)
    raw = out.read_bytes().split(b"\0")
    got = dict(item.decode().split("=", 1) for item in raw if item)
    got.pop("PWD", None)  # added by /bin/sh itself
    path = got.pop("PATH")
    assert got == env
    assert got["INSTANCE"] == name
    assert got["TAGS"] == " ".join(tags)
    assert {"/sbin", "/usr/sbin"} <= set(path.split(":"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump", "env.out"]


def test_failing_hook_reports_code_and_output(tmp_path: Path) -> None:
    hook = write_hook(tmp_path / "fail", "echo to-stdout\necho to-stderr >&2\nexit 3\n")
    with pytest.raises(errors.HypervisorError) as info:
        ifup.run_ifup(hook, {"INTERFACE": "gnt.tap9"})
    text = str(info.value)
    assert "code 3" in text and "to-stdout" in text and "to-stderr" in text
    assert hook in text and "gnt.tap9" in text


def test_hung_hook_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    hook = write_hook(tmp_path / "hang", f"sleep 60 &\necho $! > '{pidfile}'\nwait\n")
    started = time.monotonic()
    with pytest.raises(errors.HypervisorError, match="did not finish within"):
        ifup.run_ifup(hook, {"INTERFACE": "t"}, timeout=1.0)
    assert time.monotonic() - started < 10
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child), "the hook's child survived the timeout"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            state = next(line for line in handle if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return " Z " not in state and "zombie" not in state


def test_missing_or_non_executable_hook(tmp_path: Path) -> None:
    with pytest.raises(errors.HypervisorError, match="missing or not executable"):
        ifup.run_ifup(str(tmp_path / "nope"), {})
    hook = tmp_path / "noexec"
    hook.write_text("#!/bin/sh\n")
    with pytest.raises(errors.HypervisorError, match="missing or not executable"):
        ifup.run_ifup(str(hook), {})


def test_bad_namespace(tmp_path: Path) -> None:
    hook = write_hook(tmp_path / "ok", "exit 0\n")
    with pytest.raises(errors.HypervisorError, match="does not exist"):
        ifup.run_ifup(hook, {}, netns="gk-test-no-such-ns")


def test_shipped_hook_is_executable_posix_sh() -> None:
    mode = os.stat(c.KVM_IFUP).st_mode
    assert mode & stat.S_IXUSR
    with open(c.KVM_IFUP, encoding="utf-8") as handle:
        assert handle.readline() == "#!/bin/sh\n"
    dash = "/bin/dash" if os.path.exists("/bin/dash") else "/bin/sh"
    subprocess.run([dash, "-n", c.KVM_IFUP], check=True, timeout=10)


# --- the shipped kvm-ifup, inside a namespace -----------------------------------

@pytest.fixture
def ns() -> Iterator[str]:
    skip_unless_netns()
    with netns("gk-test") as name:
        yield name


@pytest.fixture
def tap(ns: str) -> Iterator[str]:
    """A TAP device opened straight inside the test namespace."""
    fd, name = netdev.open_tap(netns=ns)
    try:
        yield name
    finally:
        os.close(fd)


def _link(ns: str, name: str) -> dict[str, Any]:
    links: list[dict[str, Any]] = json.loads(ns_ip(ns, "-j", "link", "show", "dev", name).stdout)
    return links[0]


def test_kvm_ifup_bridged(ns: str, tap: str) -> None:
    ns_ip(ns, "link", "add", "name", "gkbr0", "type", "bridge")
    env = ifup.nic_environment("inst1", bridged("gkbr0"), 0, tap, ["t1"])
    ifup.run_ifup(c.KVM_IFUP, env, netns=ns)
    link = _link(ns, tap)
    assert link["master"] == "gkbr0"
    assert "UP" in link["flags"]


def test_kvm_ifup_bridged_nasty_names_execute_nothing(ns: str, tap: str,
                                                      tmp_path: Path) -> None:
    ns_ip(ns, "link", "add", "name", "gkbr0", "type", "bridge")
    name = NASTY_NAME.format(d=tmp_path)
    tags = [t.format(d=tmp_path) for t in NASTY_TAGS]
    ifup.run_ifup(c.KVM_IFUP, ifup.nic_environment(name, bridged(), 0, tap, tags), netns=ns)
    with pytest.raises(errors.HypervisorError) as info:
        ifup.run_ifup(c.KVM_IFUP, ifup.nic_environment(name, bridged("gknone"), 0, tap, tags),
                      netns=ns)
    assert name in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_kvm_ifup_missing_bridge(ns: str, tap: str) -> None:
    env = ifup.nic_environment("inst1", bridged("gknobr"), 0, tap, [])
    with pytest.raises(errors.HypervisorError) as info:
        ifup.run_ifup(c.KVM_IFUP, env, netns=ns)
    text = str(info.value)
    assert "bridge 'gknobr' does not exist" in text and "code 1" in text
    assert "master" not in _link(ns, tap)


def test_kvm_ifup_bridged_without_link(ns: str, tap: str) -> None:
    env = ifup.nic_environment("inst1", bridged(""), 0, tap, [])
    with pytest.raises(errors.HypervisorError, match="bridged mode needs a bridge"):
        ifup.run_ifup(c.KVM_IFUP, env, netns=ns)


def test_kvm_ifup_routed_main_table(ns: str, tap: str) -> None:
    env = ifup.nic_environment("inst1", routed(ip="192.0.2.10"), 0, tap, [])
    ifup.run_ifup(c.KVM_IFUP, env, netns=ns)
    routes = json.loads(ns_ip(ns, "-j", "route", "show", "192.0.2.10/32").stdout)
    assert [(r["dst"], r["dev"]) for r in routes] == [("192.0.2.10", tap)]
    assert "UP" in _link(ns, tap)["flags"]
    assert ns_read(ns, f"/proc/sys/net/ipv4/conf/{tap}/proxy_arp").strip() == "1"


def test_kvm_ifup_routed_table_from_link(ns: str, tap: str) -> None:
    env = ifup.nic_environment("inst1", routed("100", ip="192.0.2.11"), 0, tap, [])
    ifup.run_ifup(c.KVM_IFUP, env, netns=ns)
    table = json.loads(ns_ip(ns, "-j", "route", "show", "table", "100").stdout)
    assert [(r["dst"], r["dev"]) for r in table] == [("192.0.2.11", tap)]
    main = json.loads(ns_ip(ns, "-j", "route", "show", "192.0.2.11/32").stdout)
    assert main == []


def test_kvm_ifup_routed_without_ip(ns: str, tap: str) -> None:
    ifup.run_ifup(c.KVM_IFUP, ifup.nic_environment("i", routed(), 0, tap, []), netns=ns)
    assert "UP" in _link(ns, tap)["flags"]
    assert json.loads(ns_ip(ns, "-j", "route", "show", "dev", tap).stdout) == []
    assert ns_read(ns, f"/proc/sys/net/ipv4/conf/{tap}/proxy_arp").strip() == "1"


def test_kvm_ifup_unknown_mode_and_missing_tap(ns: str, tap: str) -> None:
    env = ifup.nic_environment("i", Nic(nicparams={c.NIC_MODE: "openvswitch"}), 0, tap, [])
    with pytest.raises(errors.HypervisorError, match="unknown NIC mode 'openvswitch'"):
        ifup.run_ifup(c.KVM_IFUP, env, netns=ns)
    env = ifup.nic_environment("i", routed(), 0, "gk.absent", [])
    with pytest.raises(errors.HypervisorError, match="'gk.absent' does not exist"):
        ifup.run_ifup(c.KVM_IFUP, env, netns=ns)
