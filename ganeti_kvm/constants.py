"""Names and values shared with the cluster manager (the 2011 contract).

Every name here keeps the spelling and the value of the cluster manager's
``ganeti.constants`` so that code written against its KVM driver ports by
changing the import.  The names the core works with (parameter keys and
values, node paths, states) are the core's own, :mod:`ganeti_kvm.core.names`,
re-exported here; this module adds what only this contract has: the
hypervisor type, the parameter type table under its 2011 name, the cluster
defaults, the console kinds, the backend and NIC defaults.
"""

from __future__ import annotations

from ganeti_kvm.core import names as _names
from ganeti_kvm.core.names import BE_MEMORY as BE_MEMORY
from ganeti_kvm.core.names import BE_VCPUS as BE_VCPUS
from ganeti_kvm.core.names import DEFAULT_RUN_DIR as DEFAULT_RUN_DIR
from ganeti_kvm.core.names import DISK_ACCESS_SET as DISK_ACCESS_SET
from ganeti_kvm.core.names import DISK_RDONLY as DISK_RDONLY
from ganeti_kvm.core.names import DISK_RDWR as DISK_RDWR
from ganeti_kvm.core.names import HT_BO_CDROM as HT_BO_CDROM
from ganeti_kvm.core.names import HT_BO_DISK as HT_BO_DISK
from ganeti_kvm.core.names import HT_BO_FLOPPY as HT_BO_FLOPPY
from ganeti_kvm.core.names import HT_BO_NETWORK as HT_BO_NETWORK
from ganeti_kvm.core.names import HT_CACHE_DEFAULT as HT_CACHE_DEFAULT
from ganeti_kvm.core.names import HT_CACHE_NONE as HT_CACHE_NONE
from ganeti_kvm.core.names import HT_CACHE_WBACK as HT_CACHE_WBACK
from ganeti_kvm.core.names import HT_CACHE_WTHROUGH as HT_CACHE_WTHROUGH
from ganeti_kvm.core.names import HT_DISK_IDE as HT_DISK_IDE
from ganeti_kvm.core.names import HT_DISK_IOEMU as HT_DISK_IOEMU
from ganeti_kvm.core.names import HT_DISK_MTD as HT_DISK_MTD
from ganeti_kvm.core.names import HT_DISK_PARAVIRTUAL as HT_DISK_PARAVIRTUAL
from ganeti_kvm.core.names import HT_DISK_PFLASH as HT_DISK_PFLASH
from ganeti_kvm.core.names import HT_DISK_SCSI as HT_DISK_SCSI
from ganeti_kvm.core.names import HT_DISK_SD as HT_DISK_SD
from ganeti_kvm.core.names import HT_KVM_DISABLED as HT_KVM_DISABLED
from ganeti_kvm.core.names import HT_KVM_ENABLED as HT_KVM_ENABLED
from ganeti_kvm.core.names import HT_KVM_FLAG_VALUES as HT_KVM_FLAG_VALUES
from ganeti_kvm.core.names import HT_KVM_VALID_BO_TYPES as HT_KVM_VALID_BO_TYPES
from ganeti_kvm.core.names import HT_KVM_VALID_DISK_TYPES as HT_KVM_VALID_DISK_TYPES
from ganeti_kvm.core.names import HT_KVM_VALID_MOUSE_TYPES as HT_KVM_VALID_MOUSE_TYPES
from ganeti_kvm.core.names import HT_KVM_VALID_NIC_TYPES as HT_KVM_VALID_NIC_TYPES
from ganeti_kvm.core.names import HT_KVM_VALID_SM_TYPES as HT_KVM_VALID_SM_TYPES
from ganeti_kvm.core.names import HT_MIGRATION_LIVE as HT_MIGRATION_LIVE
from ganeti_kvm.core.names import HT_MIGRATION_MODES as HT_MIGRATION_MODES
from ganeti_kvm.core.names import HT_MIGRATION_NONLIVE as HT_MIGRATION_NONLIVE
from ganeti_kvm.core.names import HT_MOUSE_MOUSE as HT_MOUSE_MOUSE
from ganeti_kvm.core.names import HT_MOUSE_TABLET as HT_MOUSE_TABLET
from ganeti_kvm.core.names import HT_NIC_E1000 as HT_NIC_E1000
from ganeti_kvm.core.names import HT_NIC_I8259ER as HT_NIC_I8259ER
from ganeti_kvm.core.names import HT_NIC_I82551 as HT_NIC_I82551
from ganeti_kvm.core.names import HT_NIC_I85557B as HT_NIC_I85557B
from ganeti_kvm.core.names import HT_NIC_NE2K_ISA as HT_NIC_NE2K_ISA
from ganeti_kvm.core.names import HT_NIC_NE2K_PCI as HT_NIC_NE2K_PCI
from ganeti_kvm.core.names import HT_NIC_PARAVIRTUAL as HT_NIC_PARAVIRTUAL
from ganeti_kvm.core.names import HT_NIC_PCNET as HT_NIC_PCNET
from ganeti_kvm.core.names import HT_NIC_RTL8139 as HT_NIC_RTL8139
from ganeti_kvm.core.names import HT_SM_NONE as HT_SM_NONE
from ganeti_kvm.core.names import HT_SM_POOL as HT_SM_POOL
from ganeti_kvm.core.names import HT_SM_USER as HT_SM_USER
from ganeti_kvm.core.names import HT_VALID_CACHE_TYPES as HT_VALID_CACHE_TYPES
from ganeti_kvm.core.names import HV_ACPI as HV_ACPI
from ganeti_kvm.core.names import HV_BOOT_ORDER as HV_BOOT_ORDER
from ganeti_kvm.core.names import HV_CDROM_IMAGE_PATH as HV_CDROM_IMAGE_PATH
from ganeti_kvm.core.names import HV_DISK_CACHE as HV_DISK_CACHE
from ganeti_kvm.core.names import HV_DISK_TYPE as HV_DISK_TYPE
from ganeti_kvm.core.names import HV_INITRD_PATH as HV_INITRD_PATH
from ganeti_kvm.core.names import HV_KERNEL_ARGS as HV_KERNEL_ARGS
from ganeti_kvm.core.names import HV_KERNEL_PATH as HV_KERNEL_PATH
from ganeti_kvm.core.names import HV_KEYMAP as HV_KEYMAP
from ganeti_kvm.core.names import HV_KVM_CDROM2_IMAGE_PATH as HV_KVM_CDROM2_IMAGE_PATH
from ganeti_kvm.core.names import HV_KVM_CDROM_DISK_TYPE as HV_KVM_CDROM_DISK_TYPE
from ganeti_kvm.core.names import HV_KVM_FLAG as HV_KVM_FLAG
from ganeti_kvm.core.names import HV_KVM_FLOPPY_IMAGE_PATH as HV_KVM_FLOPPY_IMAGE_PATH
from ganeti_kvm.core.names import HV_KVM_PATH as HV_KVM_PATH
from ganeti_kvm.core.names import HV_KVM_SPICE_BIND as HV_KVM_SPICE_BIND
from ganeti_kvm.core.names import HV_KVM_SPICE_IP_VERSION as HV_KVM_SPICE_IP_VERSION
from ganeti_kvm.core.names import HV_KVM_USE_CHROOT as HV_KVM_USE_CHROOT
from ganeti_kvm.core.names import HV_MEM_PATH as HV_MEM_PATH
from ganeti_kvm.core.names import HV_MIGRATION_BANDWIDTH as HV_MIGRATION_BANDWIDTH
from ganeti_kvm.core.names import HV_MIGRATION_DOWNTIME as HV_MIGRATION_DOWNTIME
from ganeti_kvm.core.names import HV_MIGRATION_MODE as HV_MIGRATION_MODE
from ganeti_kvm.core.names import HV_MIGRATION_PORT as HV_MIGRATION_PORT
from ganeti_kvm.core.names import HV_NIC_TYPE as HV_NIC_TYPE
from ganeti_kvm.core.names import HV_REBOOT_BEHAVIOR as HV_REBOOT_BEHAVIOR
from ganeti_kvm.core.names import HV_ROOT_PATH as HV_ROOT_PATH
from ganeti_kvm.core.names import HV_SECURITY_DOMAIN as HV_SECURITY_DOMAIN
from ganeti_kvm.core.names import HV_SECURITY_MODEL as HV_SECURITY_MODEL
from ganeti_kvm.core.names import HV_SERIAL_CONSOLE as HV_SERIAL_CONSOLE
from ganeti_kvm.core.names import HV_SERIAL_SPEED as HV_SERIAL_SPEED
from ganeti_kvm.core.names import HV_STATE_PAUSED as HV_STATE_PAUSED
from ganeti_kvm.core.names import HV_STATE_RUNNING as HV_STATE_RUNNING
from ganeti_kvm.core.names import HV_STATE_UNKNOWN as HV_STATE_UNKNOWN
from ganeti_kvm.core.names import HV_USB_MOUSE as HV_USB_MOUSE
from ganeti_kvm.core.names import HV_USE_LOCALTIME as HV_USE_LOCALTIME
from ganeti_kvm.core.names import HV_VHOST_NET as HV_VHOST_NET
from ganeti_kvm.core.names import HV_VNC_BIND_ADDRESS as HV_VNC_BIND_ADDRESS
from ganeti_kvm.core.names import HV_VNC_PASSWORD_FILE as HV_VNC_PASSWORD_FILE
from ganeti_kvm.core.names import HV_VNC_TLS as HV_VNC_TLS
from ganeti_kvm.core.names import HV_VNC_X509 as HV_VNC_X509
from ganeti_kvm.core.names import HV_VNC_X509_VERIFY as HV_VNC_X509_VERIFY
from ganeti_kvm.core.names import IFACE_NO_IP_VERSION_SPECIFIED as IFACE_NO_IP_VERSION_SPECIFIED
from ganeti_kvm.core.names import INSTANCE_REBOOT_ALLOWED as INSTANCE_REBOOT_ALLOWED
from ganeti_kvm.core.names import INSTANCE_REBOOT_EXIT as INSTANCE_REBOOT_EXIT
from ganeti_kvm.core.names import IP4_ADDRESS_ANY as IP4_ADDRESS_ANY
from ganeti_kvm.core.names import IP4_VERSION as IP4_VERSION
from ganeti_kvm.core.names import IP6_VERSION as IP6_VERSION
from ganeti_kvm.core.names import KVM_CONSOLE_WRAPPER as KVM_CONSOLE_WRAPPER
from ganeti_kvm.core.names import KVM_IFUP as KVM_IFUP
from ganeti_kvm.core.names import KVM_PATH as KVM_PATH
from ganeti_kvm.core.names import NIC_LINK as NIC_LINK
from ganeti_kvm.core.names import NIC_MODE as NIC_MODE
from ganeti_kvm.core.names import NIC_MODE_BRIDGED as NIC_MODE_BRIDGED
from ganeti_kvm.core.names import NIC_MODE_ROUTED as NIC_MODE_ROUTED
from ganeti_kvm.core.names import NIC_VALID_MODES as NIC_VALID_MODES
from ganeti_kvm.core.names import REBOOT_BEHAVIORS as REBOOT_BEHAVIORS
from ganeti_kvm.core.names import RUN_DIR_ENV as RUN_DIR_ENV
from ganeti_kvm.core.names import SOCAT_PATH as SOCAT_PATH
from ganeti_kvm.core.names import VALID_IP_VERSIONS as VALID_IP_VERSIONS
from ganeti_kvm.core.names import VALID_SERIAL_SPEEDS as VALID_SERIAL_SPEEDS
from ganeti_kvm.core.names import VNC_BASE_PORT as VNC_BASE_PORT
from ganeti_kvm.core.names import VTYPE_BOOL as VTYPE_BOOL
from ganeti_kvm.core.names import VTYPE_INT as VTYPE_INT
from ganeti_kvm.core.names import VTYPE_MAYBE_STRING as VTYPE_MAYBE_STRING
from ganeti_kvm.core.names import VTYPE_STRING as VTYPE_STRING

# Hypervisor types
HT_KVM = "kvm"
HYPER_TYPES = frozenset([HT_KVM])

# The value type of every hypervisor parameter
# (the 2011 keys only: the core's Ganeti 3.x keys are not part of this contract)
HVS_PARAMETER_TYPES = {key: vtype for key, vtype in _names.PARAMETER_TYPES.items()
                       if key in _names.KEYS_2011}
HVS_PARAMETERS = _names.KEYS_2011

# socat's raw mode with an escape key (Ctrl+]) for serial consoles
SOCAT_USE_ESCAPE = True
SOCAT_ESCAPE_CODE = "0x1d"
# The user a serial console's ssh command logs in as
GANETI_RUNAS = "root"

# Disk templates whose storage the nodes share (the 2011 driver forces
# disk_cache none for them, so that a migration cannot corrupt the data)
DT_SHARED_FILE = "sharedfile"
DT_BLOCK = "blockdev"
DTS_EXT_MIRROR = frozenset([DT_SHARED_FILE, DT_BLOCK])

# The cluster defaults: the core's (every key and value of the 2011 driver's,
# Ganeti 2.5, plus kvm_path and serial_speed, which later Ganeti versions
# added with these same defaults).
HVC_DEFAULTS = {HT_KVM: {key: value for key, value in _names.DEFAULTS.items()
                         if key in _names.KEYS_2011}}

# Backend parameters
BE_AUTO_BALANCE = "auto_balance"
BEC_DEFAULTS = {BE_MEMORY: 128, BE_VCPUS: 1, BE_AUTO_BALANCE: True}

# NIC parameters
NICC_DEFAULTS = {NIC_MODE: NIC_MODE_BRIDGED, NIC_LINK: ""}

# Console kinds
CONS_SSH = "ssh"
CONS_VNC = "vnc"
CONS_SPICE = "spice"
CONS_MESSAGE = "msg"
CONS_ALL = frozenset([CONS_SSH, CONS_VNC, CONS_SPICE, CONS_MESSAGE])
