"""ganeti-kvm: run QEMU/KVM virtual machines for a cluster manager.

The public contract keeps the cluster manager's module names, so code
written against its KVM driver ports by changing the import prefix:

- :mod:`ganeti_kvm.constants` -- parameter names, values and defaults
- :mod:`ganeti_kvm.errors` -- the exceptions (root: ``GenericError``)
- :mod:`ganeti_kvm.objects` -- Instance, NIC, Disk, InstanceConsole
- :mod:`ganeti_kvm.hv_base` -- BaseHypervisor and the parameter checks
- :mod:`ganeti_kvm.hv_kvm` -- KVMHypervisor

Ganeti 3.x's contract is :mod:`ganeti_kvm.ganeti3`.  Both are thin adapters
over one contract-neutral core (:mod:`ganeti_kvm.core`), which builds on
QEMU (:mod:`ganeti_kvm.qemu`), its monitors (:mod:`ganeti_kvm.qmp`) and the
node's operating system (:mod:`ganeti_kvm.host`); the programs are in
:mod:`ganeti_kvm.tools`.

The library logs through :mod:`logging` and stays silent unless the
application configures logging.
"""

import logging as _logging

__version__ = "0.1.0"
__all__ = ["constants", "errors", "objects", "hv_base", "hv_kvm", "__version__"]

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
