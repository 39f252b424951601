"""The core's vocabulary: hypervisor parameter keys and values, node paths.

Everything the contract-neutral core (and the QEMU layer below it) needs to
name lives here: the keys of the hypervisor parameters the core implements,
their values, their types and the core's defaults, the backend keys it
reads, the node's default paths and the states it reports.  The spellings
and values are the cluster manager's, so both contracts map onto them
without translation: :mod:`ganeti_kvm.constants` (the 2011 contract)
re-exports them under the same names and adds its own (console kinds,
cluster defaults, ...); :mod:`ganeti_kvm.ganeti3` maps Ganeti 3.x's
hvparams onto these keys.  Names that the host layer defines (the run
directory, the shipped programs, the NIC parameters of the ifup hook) are
taken from there, so each value has one home.
"""

from __future__ import annotations

# The NIC parameters the ifup hook is told about, and its modes
from ganeti_kvm.host.ifup import NIC_LINK as NIC_LINK
from ganeti_kvm.host.ifup import NIC_MODE as NIC_MODE
from ganeti_kvm.host.ifup import NIC_MODE_BRIDGED as NIC_MODE_BRIDGED
from ganeti_kvm.host.ifup import NIC_MODE_ROUTED as NIC_MODE_ROUTED
from ganeti_kvm.host.ifup import NIC_VALID_MODES as NIC_VALID_MODES

# Where every instance's runtime state lives unless told otherwise, and the
# programs shipped with this package
from ganeti_kvm.host.paths import DEFAULT_RUN_DIR as DEFAULT_RUN_DIR
from ganeti_kvm.host.paths import KVM_CONSOLE_WRAPPER as KVM_CONSOLE_WRAPPER
from ganeti_kvm.host.paths import KVM_IFUP as KVM_IFUP
from ganeti_kvm.host.paths import RUN_DIR_ENV as RUN_DIR_ENV

# Hypervisor parameter names (the cluster manager's spelling and values)
HV_KERNEL_PATH = "kernel_path"
HV_INITRD_PATH = "initrd_path"
HV_ROOT_PATH = "root_path"
HV_KERNEL_ARGS = "kernel_args"
HV_ACPI = "acpi"
HV_SERIAL_CONSOLE = "serial_console"
HV_SERIAL_SPEED = "serial_speed"
HV_VNC_BIND_ADDRESS = "vnc_bind_address"
HV_VNC_TLS = "vnc_tls"
HV_VNC_X509 = "vnc_x509_path"
HV_VNC_X509_VERIFY = "vnc_x509_verify"
HV_VNC_PASSWORD_FILE = "vnc_password_file"
HV_KVM_SPICE_BIND = "spice_bind"
HV_KVM_SPICE_IP_VERSION = "spice_ip_version"
HV_KVM_SPICE_PASSWORD_FILE = "spice_password_file"
HV_KVM_SPICE_LOSSLESS_IMG_COMPR = "spice_image_compression"
HV_KVM_SPICE_JPEG_IMG_COMPR = "spice_jpeg_wan_compression"
HV_KVM_SPICE_ZLIB_GLZ_IMG_COMPR = "spice_zlib_glz_wan_compression"
HV_KVM_SPICE_STREAMING_VIDEO_DETECTION = "spice_streaming_video"
HV_KVM_SPICE_AUDIO_COMPR = "spice_playback_compression"
HV_KVM_SPICE_USE_TLS = "spice_use_tls"
HV_KVM_SPICE_TLS_CIPHERS = "spice_tls_ciphers"
HV_KVM_SPICE_USE_VDAGENT = "spice_use_vdagent"
HV_KEYMAP = "keymap"
HV_REBOOT_BEHAVIOR = "reboot_behavior"
HV_KVM_FLOPPY_IMAGE_PATH = "floppy_image_path"
HV_CDROM_IMAGE_PATH = "cdrom_image_path"
HV_KVM_CDROM2_IMAGE_PATH = "cdrom2_image_path"
HV_BOOT_ORDER = "boot_order"
HV_NIC_TYPE = "nic_type"
HV_DISK_TYPE = "disk_type"
HV_KVM_CDROM_DISK_TYPE = "cdrom_disk_type"
HV_USB_MOUSE = "usb_mouse"
HV_MIGRATION_PORT = "migration_port"
HV_MIGRATION_BANDWIDTH = "migration_bandwidth"
HV_MIGRATION_DOWNTIME = "migration_downtime"
HV_MIGRATION_MODE = "migration_mode"
HV_KVM_MIGRATION_CAPS = "migration_caps"
HV_USE_LOCALTIME = "use_localtime"
HV_DISK_CACHE = "disk_cache"
HV_SECURITY_MODEL = "security_model"
HV_SECURITY_DOMAIN = "security_domain"
HV_KVM_FLAG = "kvm_flag"
HV_VHOST_NET = "vhost_net"
HV_KVM_USE_CHROOT = "use_chroot"
HV_MEM_PATH = "mem_path"
HV_KVM_PATH = "kvm_path"
HV_KVM_DISK_AIO = "disk_aio"
HV_DISK_DISCARD = "disk_discard"
HV_KVM_SCSI_CONTROLLER_TYPE = "scsi_controller_type"
HV_CPU_MASK = "cpu_mask"
HV_CPU_TYPE = "cpu_type"
HV_CPU_CORES = "cpu_cores"
HV_CPU_THREADS = "cpu_threads"
HV_CPU_SOCKETS = "cpu_sockets"
HV_KVM_MACHINE_VERSION = "machine_version"
HV_VGA = "vga"
HV_SOUNDHW = "soundhw"
HV_USB_DEVICES = "usb_devices"
HV_KVM_EXTRA = "kvm_extra"
HV_VNET_HDR = "vnet_hdr"
HV_VIRTIO_NET_QUEUES = "virtio_net_queues"
HV_KVM_PCI_RESERVATIONS = "kvm_pci_reservations"
HV_USE_GUEST_AGENT = "use_guest_agent"
HV_KVM_USER_SHUTDOWN = "user_shutdown"

# Value types of hypervisor parameters
VTYPE_STRING = "string"
VTYPE_MAYBE_STRING = "maybe-string"
VTYPE_BOOL = "bool"
VTYPE_INT = "int"

# The value type of each key the core implements
PARAMETER_TYPES: dict[str, str] = {
    HV_KERNEL_PATH: VTYPE_STRING,
    HV_INITRD_PATH: VTYPE_STRING,
    HV_ROOT_PATH: VTYPE_MAYBE_STRING,
    HV_KERNEL_ARGS: VTYPE_STRING,
    HV_ACPI: VTYPE_BOOL,
    HV_SERIAL_CONSOLE: VTYPE_BOOL,
    HV_SERIAL_SPEED: VTYPE_INT,
    HV_VNC_BIND_ADDRESS: VTYPE_STRING,
    HV_VNC_TLS: VTYPE_BOOL,
    HV_VNC_X509: VTYPE_STRING,
    HV_VNC_X509_VERIFY: VTYPE_BOOL,
    HV_VNC_PASSWORD_FILE: VTYPE_STRING,
    HV_KVM_SPICE_BIND: VTYPE_STRING,
    HV_KVM_SPICE_IP_VERSION: VTYPE_INT,
    HV_KVM_SPICE_PASSWORD_FILE: VTYPE_STRING,
    HV_KVM_SPICE_LOSSLESS_IMG_COMPR: VTYPE_STRING,
    HV_KVM_SPICE_JPEG_IMG_COMPR: VTYPE_STRING,
    HV_KVM_SPICE_ZLIB_GLZ_IMG_COMPR: VTYPE_STRING,
    HV_KVM_SPICE_STREAMING_VIDEO_DETECTION: VTYPE_STRING,
    HV_KVM_SPICE_AUDIO_COMPR: VTYPE_BOOL,
    HV_KVM_SPICE_USE_TLS: VTYPE_BOOL,
    HV_KVM_SPICE_TLS_CIPHERS: VTYPE_STRING,
    HV_KVM_SPICE_USE_VDAGENT: VTYPE_BOOL,
    HV_KEYMAP: VTYPE_STRING,
    HV_REBOOT_BEHAVIOR: VTYPE_STRING,
    HV_KVM_FLOPPY_IMAGE_PATH: VTYPE_STRING,
    HV_CDROM_IMAGE_PATH: VTYPE_STRING,
    HV_KVM_CDROM2_IMAGE_PATH: VTYPE_STRING,
    HV_BOOT_ORDER: VTYPE_STRING,
    HV_NIC_TYPE: VTYPE_STRING,
    HV_DISK_TYPE: VTYPE_STRING,
    HV_KVM_CDROM_DISK_TYPE: VTYPE_STRING,
    HV_USB_MOUSE: VTYPE_STRING,
    HV_MIGRATION_PORT: VTYPE_INT,
    HV_MIGRATION_BANDWIDTH: VTYPE_INT,
    HV_MIGRATION_DOWNTIME: VTYPE_INT,
    HV_MIGRATION_MODE: VTYPE_STRING,
    HV_KVM_MIGRATION_CAPS: VTYPE_STRING,
    HV_USE_LOCALTIME: VTYPE_BOOL,
    HV_DISK_CACHE: VTYPE_STRING,
    HV_SECURITY_MODEL: VTYPE_STRING,
    HV_SECURITY_DOMAIN: VTYPE_STRING,
    HV_KVM_FLAG: VTYPE_STRING,
    HV_VHOST_NET: VTYPE_BOOL,
    HV_KVM_USE_CHROOT: VTYPE_BOOL,
    HV_MEM_PATH: VTYPE_STRING,
    HV_KVM_PATH: VTYPE_STRING,
    HV_KVM_DISK_AIO: VTYPE_STRING,
    HV_DISK_DISCARD: VTYPE_STRING,
    HV_KVM_SCSI_CONTROLLER_TYPE: VTYPE_STRING,
    HV_CPU_MASK: VTYPE_STRING,
    HV_CPU_TYPE: VTYPE_STRING,
    HV_CPU_CORES: VTYPE_INT,
    HV_USE_GUEST_AGENT: VTYPE_BOOL,
    HV_KVM_USER_SHUTDOWN: VTYPE_BOOL,
    HV_CPU_THREADS: VTYPE_INT,
    HV_CPU_SOCKETS: VTYPE_INT,
    HV_KVM_MACHINE_VERSION: VTYPE_STRING,
    HV_VGA: VTYPE_STRING,
    HV_SOUNDHW: VTYPE_STRING,
    HV_USB_DEVICES: VTYPE_STRING,
    HV_KVM_EXTRA: VTYPE_STRING,
    HV_VNET_HDR: VTYPE_BOOL,
    HV_VIRTIO_NET_QUEUES: VTYPE_INT,
    HV_KVM_PCI_RESERVATIONS: VTYPE_INT,
}
PARAMETER_KEYS = frozenset(PARAMETER_TYPES)
# The 2011 contract's keys (constants.HVS_PARAMETERS): Ganeti 2.5's, plus
# kvm_path and serial_speed.  Every other key is Ganeti 3.x's: only the
# Ganeti 3 contract offers it.
KEYS_2011 = frozenset([
    HV_KERNEL_PATH, HV_INITRD_PATH, HV_ROOT_PATH, HV_KERNEL_ARGS, HV_ACPI,
    HV_SERIAL_CONSOLE, HV_SERIAL_SPEED, HV_VNC_BIND_ADDRESS, HV_VNC_TLS, HV_VNC_X509,
    HV_VNC_X509_VERIFY, HV_VNC_PASSWORD_FILE, HV_KVM_SPICE_BIND, HV_KVM_SPICE_IP_VERSION,
    HV_KEYMAP, HV_REBOOT_BEHAVIOR, HV_KVM_FLOPPY_IMAGE_PATH, HV_CDROM_IMAGE_PATH,
    HV_KVM_CDROM2_IMAGE_PATH, HV_BOOT_ORDER, HV_NIC_TYPE, HV_DISK_TYPE,
    HV_KVM_CDROM_DISK_TYPE, HV_USB_MOUSE, HV_MIGRATION_PORT, HV_MIGRATION_BANDWIDTH,
    HV_MIGRATION_DOWNTIME, HV_MIGRATION_MODE, HV_USE_LOCALTIME, HV_DISK_CACHE,
    HV_SECURITY_MODEL, HV_SECURITY_DOMAIN, HV_KVM_FLAG, HV_VHOST_NET, HV_KVM_USE_CHROOT,
    HV_MEM_PATH, HV_KVM_PATH,
])

# Boot order
HT_BO_FLOPPY = "floppy"
HT_BO_CDROM = "cdrom"
HT_BO_DISK = "disk"
HT_BO_NETWORK = "network"
HT_KVM_VALID_BO_TYPES = frozenset([HT_BO_FLOPPY, HT_BO_CDROM, HT_BO_DISK, HT_BO_NETWORK])

# NIC models
HT_NIC_RTL8139 = "rtl8139"
HT_NIC_NE2K_PCI = "ne2k_pci"
HT_NIC_NE2K_ISA = "ne2k_isa"
HT_NIC_I82551 = "i82551"
HT_NIC_I85557B = "i82557b"
HT_NIC_I8259ER = "i82559er"
HT_NIC_PCNET = "pcnet"
HT_NIC_E1000 = "e1000"
HT_NIC_PARAVIRTUAL = HT_DISK_PARAVIRTUAL = "paravirtual"
HT_KVM_VALID_NIC_TYPES = frozenset([
    HT_NIC_RTL8139, HT_NIC_NE2K_PCI, HT_NIC_NE2K_ISA, HT_NIC_I82551,
    HT_NIC_I85557B, HT_NIC_I8259ER, HT_NIC_PCNET, HT_NIC_E1000,
    HT_NIC_PARAVIRTUAL,
])

# Disk types
HT_DISK_IOEMU = "ioemu"
HT_DISK_IDE = "ide"
HT_DISK_SCSI = "scsi"
HT_DISK_SD = "sd"
HT_DISK_MTD = "mtd"
HT_DISK_PFLASH = "pflash"
HT_KVM_VALID_DISK_TYPES = frozenset([
    HT_DISK_PARAVIRTUAL, HT_DISK_IDE, HT_DISK_SCSI, HT_DISK_SD,
    HT_DISK_MTD, HT_DISK_PFLASH,
])

# Disk cache modes
HT_CACHE_DEFAULT = "default"
HT_CACHE_NONE = "none"
HT_CACHE_WTHROUGH = "writethrough"
HT_CACHE_WBACK = "writeback"
HT_VALID_CACHE_TYPES = frozenset([
    HT_CACHE_DEFAULT, HT_CACHE_NONE, HT_CACHE_WTHROUGH, HT_CACHE_WBACK,
])

# How QEMU submits a disk's I/O to the host (HV_KVM_DISK_AIO): a thread
# pool (QEMU's default), Linux native AIO (needs O_DIRECT, so cache=none),
# or io_uring (needs a QEMU built with it and a kernel that allows it)
HT_KVM_AIO_THREADS = "threads"
HT_KVM_AIO_NATIVE = "native"
HT_KVM_AIO_IO_URING = "io_uring"
HT_KVM_VALID_AIO_TYPES = frozenset([HT_KVM_AIO_THREADS, HT_KVM_AIO_NATIVE, HT_KVM_AIO_IO_URING])

# What a guest's discard (TRIM/UNMAP) request does (HV_DISK_DISCARD):
# QEMU's default, ignored, or passed on to the host storage
HT_DISCARD_DEFAULT = "default"
HT_DISCARD_IGNORE = "ignore"
HT_DISCARD_UNMAP = "unmap"
HT_VALID_DISCARD_TYPES = frozenset([HT_DISCARD_DEFAULT, HT_DISCARD_IGNORE, HT_DISCARD_UNMAP])

# The SCSI controller of disk_type scsi (HV_KVM_SCSI_CONTROLLER_TYPE)
HT_SCSI_CONTROLLER_LSI = "lsi"
HT_SCSI_CONTROLLER_MEGASAS = "megasas"
HT_SCSI_CONTROLLER_VIRTIO = "virtio-scsi-pci"
HT_KVM_VALID_SCSI_CONTROLLER_TYPES = frozenset([
    HT_SCSI_CONTROLLER_LSI, HT_SCSI_CONTROLLER_MEGASAS, HT_SCSI_CONTROLLER_VIRTIO,
])

# USB pointing devices
HT_MOUSE_MOUSE = "mouse"
HT_MOUSE_TABLET = "tablet"
HT_KVM_VALID_MOUSE_TYPES = frozenset([HT_MOUSE_MOUSE, HT_MOUSE_TABLET])

# Security models
HT_SM_NONE = "none"
HT_SM_USER = "user"
HT_SM_POOL = "pool"
HT_KVM_VALID_SM_TYPES = frozenset([HT_SM_NONE, HT_SM_USER, HT_SM_POOL])

# KVM acceleration
HT_KVM_ENABLED = "enabled"
HT_KVM_DISABLED = "disabled"
HT_KVM_FLAG_VALUES = frozenset([HT_KVM_ENABLED, HT_KVM_DISABLED])

# Migration
HT_MIGRATION_LIVE = "live"
HT_MIGRATION_NONLIVE = "non-live"
HT_MIGRATION_MODES = frozenset([HT_MIGRATION_LIVE, HT_MIGRATION_NONLIVE])
# QEMU migration capabilities HV_KVM_MIGRATION_CAPS may name (a colon-separated
# list): those that speed up or converge a migration and that both QEMUs
# (7.2, 10.0) have.  They are set on both ends; postcopy-ram lets the library
# switch a migration that does not converge to post-copy.
MIGRATION_CAPS_SEP = ":"
MIGRATION_CAP_POSTCOPY = "postcopy-ram"
MIGRATION_CAP_AUTO_CONVERGE = "auto-converge"
HT_KVM_VALID_MIGRATION_CAPS = frozenset([
    "xbzrle", MIGRATION_CAP_AUTO_CONVERGE, MIGRATION_CAP_POSTCOPY, "multifd", "release-ram",
    "postcopy-preempt",
])

# What a guest's reboot does (HV_REBOOT_BEHAVIOR)
INSTANCE_REBOOT_ALLOWED = "reboot"
INSTANCE_REBOOT_EXIT = "exit"
REBOOT_BEHAVIORS = frozenset([INSTANCE_REBOOT_ALLOWED, INSTANCE_REBOOT_EXIT])

# IP versions (HV_KVM_SPICE_IP_VERSION); 0 leaves the choice to the address
IFACE_NO_IP_VERSION_SPECIFIED = 0
IP4_VERSION = 4
IP6_VERSION = 6
VALID_IP_VERSIONS = frozenset([IP4_VERSION, IP6_VERSION])

# SPICE image compression (HV_KVM_SPICE_LOSSLESS_IMG_COMPR), the WAN
# compression of JPEG and zlib-glz images, and video stream detection: the
# values of QEMU's -spice options of the same names
HT_KVM_SPICE_VALID_LOSSLESS_IMG_COMPR_OPTIONS = frozenset([
    "auto_glz", "auto_lz", "glz", "lz", "off", "quic"])
HT_KVM_SPICE_VALID_LOSSY_IMG_COMPR_OPTIONS = frozenset(["always", "auto", "never"])
HT_KVM_SPICE_VALID_VIDEO_STREAM_DETECTION_OPTIONS = frozenset(["all", "filter", "off"])
# OpenSSL's cipher list of Ganeti's default spice_tls_ciphers
SPICE_DEFAULT_TLS_CIPHERS = "HIGH:-DES:-3DES:-EXPORT:-DH"

# Serial line speeds QEMU's chardev and the kernel's console agree on
VALID_SERIAL_SPEEDS = (75, 110, 300, 600, 1200, 1800, 2400, 4800, 9600,
                       14400, 19200, 28800, 38400, 57600, 115200, 230400,
                       345600, 460800)

# Display adapters (HV_VGA): the values of QEMU's -vga for a PC machine
HT_VGA_STD = "std"
HT_VGA_CIRRUS = "cirrus"
HT_VGA_VMWARE = "vmware"
HT_VGA_QXL = "qxl"
HT_VGA_VIRTIO = "virtio"
HT_VGA_NONE = "none"
HT_KVM_VALID_VGA_TYPES = frozenset([HT_VGA_STD, HT_VGA_CIRRUS, HT_VGA_VMWARE, HT_VGA_QXL,
                                    HT_VGA_VIRTIO, HT_VGA_NONE])

# Sound cards (HV_SOUNDHW, a comma-separated list): the names of QEMU's old -soundhw
HT_SOUND_HDA = "hda"
HT_KVM_VALID_SOUND_TYPES = frozenset([HT_SOUND_HDA, "ac97", "es1370", "sb16", "cs4231a",
                                      "adlib", "gus", "pcspk"])

# USB devices (HV_USB_DEVICES, a space- or comma-separated list): the names of
# QEMU's old -usbdevice (but braille, which needs a chardev), plus
# host:BUS.ADDR and host:VENDOR:PRODUCT passthrough
HT_KVM_VALID_USB_TYPES = frozenset(["mouse", "tablet", "keyboard", "wacom-tablet"])

# Queues of a virtio NIC's TAP device (HV_VIRTIO_NET_QUEUES): Ganeti's limit
MAX_VIRTIO_NET_QUEUES = 8

# PCI slots QEMU places its own devices in before the instance's NICs and disks
# (HV_KVM_PCI_RESERVATIONS): Ganeti's QEMU_PCI_SLOTS and its default reservation.
QEMU_PCI_SLOTS = 32
QEMU_DEFAULT_PCI_RESERVATIONS = 12
# Slots 0-2 of a PC machine are the host bridge, the ISA bridge and the display
MIN_PCI_RESERVATIONS = 3

# CPU pinning (HV_CPU_MASK): one entry per vCPU, or one for all of them, each
# a CPU list ("0-2,5") or "all" (no pinning)
CPU_PINNING_SEP = ":"
CPU_PINNING_ALL = "all"

KVM_PATH = "/usr/bin/kvm"
SOCAT_PATH = "/usr/bin/socat"

# The core's value of each key when none is given: the 2011 driver's (Ganeti
# 2.5) defaults, plus kvm_path and serial_speed, which later Ganeti versions
# added with these same defaults.
DEFAULTS: dict[str, object] = {
    HV_KVM_PATH: KVM_PATH,
    HV_KERNEL_PATH: "/boot/vmlinuz-2.6-kvmU",
    HV_INITRD_PATH: "",
    HV_KERNEL_ARGS: "ro",
    HV_ROOT_PATH: "/dev/vda1",
    HV_ACPI: True,
    HV_SERIAL_CONSOLE: True,
    HV_SERIAL_SPEED: 38400,
    HV_VNC_BIND_ADDRESS: "",
    HV_VNC_TLS: False,
    HV_VNC_X509: "",
    HV_VNC_X509_VERIFY: False,
    HV_VNC_PASSWORD_FILE: "",
    HV_KVM_SPICE_BIND: "",
    HV_KVM_SPICE_IP_VERSION: IFACE_NO_IP_VERSION_SPECIFIED,
    HV_KVM_FLOPPY_IMAGE_PATH: "",
    HV_CDROM_IMAGE_PATH: "",
    HV_KVM_CDROM2_IMAGE_PATH: "",
    HV_BOOT_ORDER: HT_BO_DISK,
    HV_NIC_TYPE: HT_NIC_PARAVIRTUAL,
    HV_DISK_TYPE: HT_DISK_PARAVIRTUAL,
    HV_KVM_CDROM_DISK_TYPE: "",
    HV_USB_MOUSE: "",
    HV_KEYMAP: "",
    HV_MIGRATION_PORT: 8102,
    HV_MIGRATION_BANDWIDTH: 32,
    HV_MIGRATION_DOWNTIME: 30,
    HV_MIGRATION_MODE: HT_MIGRATION_LIVE,
    HV_KVM_MIGRATION_CAPS: "",  # Ganeti 3.x's key, with Ganeti 3.0's default
    HV_USE_LOCALTIME: False,
    HV_DISK_CACHE: HT_CACHE_DEFAULT,
    HV_SECURITY_MODEL: HT_SM_NONE,
    HV_SECURITY_DOMAIN: "",
    HV_KVM_FLAG: "",
    HV_VHOST_NET: False,
    HV_KVM_USE_CHROOT: False,
    HV_MEM_PATH: "",
    HV_REBOOT_BEHAVIOR: INSTANCE_REBOOT_ALLOWED,
    HV_KVM_DISK_AIO: HT_KVM_AIO_THREADS,
    HV_DISK_DISCARD: HT_DISCARD_DEFAULT,
    HV_KVM_SCSI_CONTROLLER_TYPE: HT_SCSI_CONTROLLER_LSI,
    HV_CPU_MASK: CPU_PINNING_ALL,
    HV_CPU_TYPE: "",
    HV_CPU_CORES: 0,
    HV_CPU_THREADS: 0,
    HV_CPU_SOCKETS: 0,
    HV_KVM_MACHINE_VERSION: "",
    # Ganeti 3.x's keys, with Ganeti 3.0's defaults
    HV_VGA: "",
    HV_SOUNDHW: "",
    HV_USB_DEVICES: "",
    HV_KVM_EXTRA: "",
    HV_VNET_HDR: True,
    HV_VIRTIO_NET_QUEUES: 1,
    HV_KVM_PCI_RESERVATIONS: 12,
    HV_USE_GUEST_AGENT: False,
    HV_KVM_USER_SHUTDOWN: False,
    HV_KVM_SPICE_PASSWORD_FILE: "",
    HV_KVM_SPICE_LOSSLESS_IMG_COMPR: "",
    HV_KVM_SPICE_JPEG_IMG_COMPR: "",
    HV_KVM_SPICE_ZLIB_GLZ_IMG_COMPR: "",
    HV_KVM_SPICE_STREAMING_VIDEO_DETECTION: "",
    HV_KVM_SPICE_AUDIO_COMPR: True,
    HV_KVM_SPICE_USE_TLS: False,
    HV_KVM_SPICE_TLS_CIPHERS: SPICE_DEFAULT_TLS_CIPHERS,
    HV_KVM_SPICE_USE_VDAGENT: True,
}

# Backend parameters the core reads
BE_MEMORY = "memory"
BE_VCPUS = "vcpus"

# Disk access modes
DISK_RDONLY = "ro"
DISK_RDWR = "rw"
DISK_ACCESS_SET = frozenset([DISK_RDONLY, DISK_RDWR])

VNC_BASE_PORT = 5900
# The address to listen on everywhere (the cluster manager's IP4_ADDRESS_ANY)
IP4_ADDRESS_ANY = "0.0.0.0"

# Instance states the core reports
HV_STATE_RUNNING = "running"
HV_STATE_PAUSED = "paused"
HV_STATE_UNKNOWN = "unknown"  # the process lives but its monitor does not answer
# QEMU is gone and ganeti-kvmd saw the guest power itself off (user_shutdown)
HV_STATE_USER_DOWN = "user-down"
