"""The Ganeti 3.x contract: :class:`KVMHypervisor` for Ganeti 3.0 and 3.1's node daemon.

A thin adapter over the contract-neutral core (:mod:`ganeti_kvm.core.node`,
:mod:`ganeti_kvm.core.migration`), next to the 2011 one in
:mod:`ganeti_kvm.hv_kvm`.  Ganeti's own modules are imported here and
nowhere below.
"""

from ganeti_kvm.ganeti3.hypervisor import KVMHypervisor

__all__ = ["KVMHypervisor"]
