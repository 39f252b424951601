"""The contract-neutral core: what a KVM node does, whichever contract asks.

Its vocabulary (hypervisor parameter keys and values, node paths) is
:mod:`ganeti_kvm.core.names`; its parameter checks are
:mod:`ganeti_kvm.core.params`.  The two contracts (the 2011 one,
:mod:`ganeti_kvm.hv_kvm`, and Ganeti 3.x's, :mod:`ganeti_kvm.ganeti3`) are
thin adapters over it; nothing here imports either of them.
"""
