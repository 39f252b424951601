#!/bin/sh
# Set up a Debian 12 machine (as root) for ganeti-kvm's tests:
#   - the Debian packages the library and its tests use;
#   - the package itself, editable, with its test extras;
#   - QEMU 10.0 from bookworm-backports, unpacked into the cache next to the
#     system's QEMU 7.2 (never installed over it);
#   - Ganeti 3.0 and 3.1's Python code, unpacked into the cache for the Ganeti
#     3.x contract tests (tests/ganeti_trees.py);
#   - Ganeti 3.0, its noop OS and sshd for the two-node cluster tests
#     (tests/cluster.py), installed without starting any service, and Ganeti
#     3.1 from bookworm-backports next to it (the machine's default stays 3.0);
#   - the tiny test guest (tests/guestimage.py).
# Idempotent, and quick when everything is already in place.
# The cache is $GANETI_KVM_CACHE (default /var/cache/ganeti-kvm).
set -eu

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${GANETI_KVM_CACHE:-/var/cache/ganeti-kvm}
# libvirglrenderer1: one of QEMU 10.0's modules (hw-display-virtio-gpu-gl)
# links to it; without it QEMU warns whenever it loads all its modules.
PACKAGES="qemu-system-x86 socat iproute2 busybox-static openssl libvirglrenderer1"
QEMU10_DIR=$CACHE/qemu-10.0
QEMU10=$QEMU10_DIR/qemu-system-x86_64
QEMU10_VERSION="QEMU emulator version 10.0"
# QEMU 10.0 looks for a module it does not find in QEMU_MODULE_DIR in the
# system's module directory too, where it finds QEMU 7.2's and aborts
# ("Only modules from the same build can be loaded", then an assertion).  So
# all of 10.0's modules must be unpacked: since 10.0 Debian ships the OpenGL
# and SPICE ones (which 7.2 has in qemu-system-common) in packages of their own.
QEMU10_PACKAGES="qemu-system-x86 qemu-system-common qemu-system-data
qemu-system-modules-opengl qemu-system-modules-spice"
export DEBIAN_FRONTEND=noninteractive

log() {
    echo "setup: $*"
}

if [ "$(id -u)" != 0 ]; then
    echo "setup: must run as root" >&2
    exit 1
fi

mkdir -p "$CACHE"
# One setup at a time (two test runs may start together).
exec 9>"$CACHE/setup.lock"
flock 9

# --- Debian packages -------------------------------------------------------

is_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

# The packages of the arguments that are not installed, each after a space.
missing_packages() {
    for package in "$@"; do
        is_installed "$package" || printf ' %s' "$package"
    done
}

# shellcheck disable=SC2086
missing=$(missing_packages $PACKAGES)
if ! python3 -m pip --version >/dev/null 2>&1; then
    missing="$missing python3-pip"
fi
# The guest build resolves the cloud kernel with apt-cache, so the package
# lists must be there too; a fresh machine may have none.
if [ -n "$missing" ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    log "apt-get update"
    apt-get update -q
fi
if [ -n "$missing" ]; then
    log "installing$missing"
    # $missing is a list of words on purpose.
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi

# --- Ganeti 3.0 for the cluster tests ----------------------------------------

# tests/cluster.py builds a two-node Ganeti cluster out of these packages, with
# every daemon and one sshd per node inside namespaces of its own.  Installing
# them must start nothing on the machine itself, yet their maintainer scripts
# would: openssh-server's starts sshd, lvm2's and dmeventd's (dependencies)
# start their units, ganeti's runs "invoke-rc.d ganeti start" (which does
# nothing until a cluster exists in the machine's own /var/lib/ganeti, and the
# tests never make one there).  All of them go through invoke-rc.d or
# deb-systemd-invoke, which obey /usr/sbin/policy-rc.d: unless the machine has
# its own, one that refuses every action (exit 101) is in place during the
# install.  openssh-server also enables sshd at boot; when it is installed here,
# /etc/ssh/sshd_not_to_be_run (Debian's switch, obeyed by its init script and
# systemd unit) keeps the machine's sshd off.  The nodes get their own /etc/ssh.
GANETI_PACKAGES="ganeti ganeti-os-noop openssh-server"
# shellcheck disable=SC2086
missing=$(missing_packages $GANETI_PACKAGES)
if [ -n "$missing" ]; then
    apt-cache show ganeti >/dev/null 2>&1 || apt-get update -q
    had_sshd=false
    is_installed openssh-server && had_sshd=true
    policy=/usr/sbin/policy-rc.d
    own_policy=false
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# ganeti-kvm scripts/setup.sh: no service starts during its install\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        own_policy=true
        trap 'rm -f "$policy"' EXIT
    fi
    log "installing$missing (starting no service)"
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
    if [ "$own_policy" = true ]; then
        rm -f "$policy"
        trap - EXIT
    fi
    if [ "$had_sshd" = false ]; then
        touch /etc/ssh/sshd_not_to_be_run
    fi
fi

# --- the Python package ----------------------------------------------------

# pip install -e takes seconds, so it is skipped when this interpreter already
# has this checkout installed from this setup.py.
pip_stamp=$CACHE/pip-stamp
pip_key="$(command -v python3) $REPO $(sha256sum "$REPO/setup.py" | cut -d' ' -f1)"
installed_from=$(cd / && python3 -c \
    'import os, pytest, ganeti_kvm; print(os.path.dirname(os.path.dirname(ganeti_kvm.__file__)))' \
    2>/dev/null || true)
if [ "$installed_from" != "$REPO" ] || [ "$(cat "$pip_stamp" 2>/dev/null || true)" != "$pip_key" ]; then
    log "pip install -e .[test]"
    # Debian's own python3 refuses pip installs (PEP 668) unless told otherwise.
    (cd "$REPO" && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q \
        --disable-pip-version-check --root-user-action=ignore -e '.[test]')
    echo "$pip_key" >"$pip_stamp"
fi

# --- QEMU 10.0 from bookworm-backports --------------------------------------

# The URI of the Debian archive serving SUITE, as the system's apt sources
# name it (deb822 .sources files or one-line .list files).
debian_mirror() {
    suite=$1
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        # Stanzas are separated by empty lines; fields may be in any order.
        awk -v suite="$suite" '
            function check() {
                gsub(/[ \t]+/, " ", suites)
                if (types ~ /(^| )deb( |$)/ && index(" " suites " ", " " suite " ") &&
                    enabled != "no" && uri != "") { print uri; found = 1; exit }
                types = suites = uri = enabled = ""
            }
            /^[ \t]*$/ { check(); next }
            /^Types:/ { sub(/^Types:[ \t]*/, ""); types = $0 }
            /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
            /^URIs:/ { uri = $2 }
            /^Enabled:/ { enabled = tolower($2) }
            END { if (!found) check() }
        ' "$file"
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$file" ] || continue
        # "deb [options] URI SUITE COMPONENT..."; options may contain spaces.
        sed -e 's/\[[^]]*\]//' "$file" |
            awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }'
    done
}

install_qemu10() {
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    mirror=$(debian_mirror "$codename" | head -n 1)
    if [ -z "$mirror" ]; then
        echo "setup: no apt source for $codename found in /etc/apt" >&2
        exit 1
    fi
    suite=$codename-backports
    log "unpacking QEMU 10.0 from $suite into $QEMU10_DIR"

    work=$(mktemp -d "$CACHE/qemu-10.0.tmp.XXXXXX")
    # Removed on failure; renamed into place on success.
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/lists/partial" "$work/dl" "$work/root"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    options=
    [ -f "$keyring" ] && options="[signed-by=$keyring] "
    echo "deb $options$mirror $suite main" >"$work/sources.list"

    # apt with only this source and its own lists; the empty Dir::Cache
    # settings keep it from rewriting the system's package caches.
    set -- -q -o "Dir::Etc::sourcelist=$work/sources.list" \
        -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$work/lists" \
        -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" \
        -o "APT::Sandbox::User=root"
    apt-get "$@" update
    # "/suite" picks the backports version even though 7.2 is installed.
    for package in $QEMU10_PACKAGES; do
        (cd "$work/dl" && apt-get "$@" download "$package/$suite")
    done
    for deb in "$work"/dl/*.deb; do
        dpkg-deb -x "$deb" "$work/root"
    done
    rm -rf "$work/dl" "$work/lists" "$work/sources.list"

    # The wrapper finds root/ next to itself, so the directory can be renamed.
    # The binary looks for its data in the system's /usr/share/qemu (7.2's),
    # so point it at its own; SeaBIOS and iPXE come from the system packages.
    cat >"$work/qemu-system-x86_64" <<'EOF'
#!/bin/sh
# QEMU 10.0 from Debian backports, unpacked by ganeti-kvm's scripts/setup.sh.
root=$(dirname "$(readlink -f "$0")")/root
QEMU_MODULE_DIR=$root/usr/lib/x86_64-linux-gnu/qemu
export QEMU_MODULE_DIR
exec "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L /usr/share/seabios "$@"
EOF
    chmod 0755 "$work/qemu-system-x86_64"
    "$work/qemu-system-x86_64" --version | grep -q "$QEMU10_VERSION"
    # Unquoted on purpose, here and below: the list as one line of words.
    # shellcheck disable=SC2086
    echo $QEMU10_PACKAGES >"$work/packages"

    rm -rf "$QEMU10_DIR"
    mv "$work" "$QEMU10_DIR"
    chmod 0755 "$QEMU10_DIR"
    trap - EXIT
}

# Reinstalled when it is not 10.0 or was unpacked from other packages.
# shellcheck disable=SC2086
if ! "$QEMU10" --version 2>/dev/null | grep -q "$QEMU10_VERSION" ||
        [ "$(cat "$QEMU10_DIR/packages" 2>/dev/null || true)" != "$(echo $QEMU10_PACKAGES)" ]; then
    install_qemu10
fi
if ! "$QEMU10" --version | grep -q "$QEMU10_VERSION"; then
    echo "setup: $QEMU10 is not $QEMU10_VERSION" >&2
    exit 1
fi
# Loads every module that provides a device: fails on a mismatched module.
if ! "$QEMU10" -machine none -device help >/dev/null; then
    echo "setup: $QEMU10 cannot list its devices" >&2
    exit 1
fi
log "$("$QEMU10" --version | head -n 1) at $QEMU10"

# --- Ganeti 3.0 and 3.1 trees, for the Ganeti 3.x contract tests ------------

# Ganeti's Python code, unpacked (never installed) into
# $CACHE/ganeti-3.0 (bookworm) and $CACHE/ganeti-3.1 (bookworm-backports);
# tests/test_ganeti3_ganeti.py imports it under Debian's python3, which needs
# the two libraries Ganeti's hypervisor modules import: OpenSSL and bitarray.
GANETI_TREE_PACKAGES="python3-openssl python3-bitarray"
# shellcheck disable=SC2086
missing=$(missing_packages $GANETI_TREE_PACKAGES)
if [ -n "$missing" ]; then
    log "installing$missing"
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi
ganeti_mirror=$(debian_mirror "$(. /etc/os-release && echo "$VERSION_CODENAME")" | head -n 1)
if [ -z "$ganeti_mirror" ]; then
    echo "setup: no apt source for the Ganeti trees found in /etc/apt" >&2
    exit 1
fi
(cd "$REPO" && GANETI_KVM_CACHE=$CACHE python3 -m tests.ganeti_trees --mirror "$ganeti_mirror")

# --- Ganeti 3.1 next to 3.0, for the cluster tests ----------------------------

# The cluster tests run on Ganeti 3.0 and 3.1 (tests/cluster.py) and upgrade
# one from 3.0 to 3.1.  Debian installs Ganeti versions side by side for
# "gnt-cluster upgrade": ganeti-3.1 and ganeti-haskell-3.1 (and htools) only
# add /usr/share/ganeti/3.1 and /usr/lib/ganeti/3.1; a node runs the version
# its /etc/ganeti/share and /etc/ganeti/lib symlinks name, and the meta
# package "ganeti" (which stays 3.0 here) owns those.  Their maintainer
# scripts only byte-compile and ask debconf, start nothing; the policy-rc.d
# guard is kept anyway.  apt gets the backports suite through a private
# sources list and lists (as for QEMU 10.0 above): the machine's own apt
# sources are left alone, so no later upgrade pulls anything from backports.
# "package/suite" picks these three packages alone from backports.  The lock
# of tests/host_ganeti.py is held: tests that switch the machine's Ganeti
# driver must not see a version appear under them.
GANETI31_PACKAGES="ganeti-3.1 ganeti-haskell-3.1 ganeti-htools-3.1"
# shellcheck disable=SC2086
missing=$(missing_packages $GANETI31_PACKAGES)
if [ -n "$missing" ]; then
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    suite=$codename-backports
    log "installing$missing from $suite, next to Ganeti 3.0 (starting no service)"
    work=$(mktemp -d "$CACHE/ganeti-3.1-apt.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/lists/partial"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    options=
    [ -f "$keyring" ] && options="[signed-by=$keyring] "
    printf 'deb %s%s %s main\ndeb %s%s %s main\n' "$options" "$ganeti_mirror" "$codename" \
        "$options" "$ganeti_mirror" "$suite" >"$work/sources.list"
    set -- -q -o "Dir::Etc::sourcelist=$work/sources.list" \
        -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$work/lists" \
        -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" \
        -o "APT::Sandbox::User=root"
    apt-get "$@" update
    targets=
    for package in $missing; do
        targets="$targets $package/$suite"
    done
    policy=/usr/sbin/policy-rc.d
    own_policy=false
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# ganeti-kvm scripts/setup.sh: no service starts during its install\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        own_policy=true
        trap 'rm -rf "$work" "$policy"' EXIT
    fi
    # shellcheck disable=SC2086
    flock /usr/share/ganeti/3.0/ganeti/hypervisor/hv_kvm \
        apt-get "$@" install -y --no-install-recommends $targets
    if [ "$own_policy" = true ]; then
        rm -f "$policy"
    fi
    rm -rf "$work"
    trap - EXIT
fi
# The machine's own Ganeti stays 3.0.
if [ "$(readlink /etc/ganeti/share)" != /usr/share/ganeti/3.0 ] ||
        [ "$(dpkg-query -W -f='${Version}' ganeti)" != "$(dpkg-query -W -f='${Version}' ganeti-3.0)" ]; then
    echo "setup: this machine's default Ganeti is no longer 3.0 (/etc/ganeti/share," \
        "package ganeti); the cluster tests expect 3.0 as the default" >&2
    exit 1
fi

# --- the test guest ---------------------------------------------------------

log "test guest"
(cd "$REPO" && GANETI_KVM_CACHE=$CACHE python3 -m tests.guestimage)

# --- the Debian package's build tools ---------------------------------------

# make deb and tests/test_deb.py build ganeti-kvm_VERSION_all.deb with
# debhelper and dh-python (pybuild), check it with lintian, and read its
# changelog with dpkg-dev's dpkg-parsechangelog.
DEB_PACKAGES="debhelper dh-python python3-all python3-setuptools dpkg-dev lintian"
# shellcheck disable=SC2086
missing=$(missing_packages $DEB_PACKAGES)
if [ -n "$missing" ]; then
    apt-cache show debhelper >/dev/null 2>&1 || apt-get update -q
    log "installing$missing"
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi
