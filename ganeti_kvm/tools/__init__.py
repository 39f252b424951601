"""The programs: the ``ganeti-kvm`` command, the serial console wrapper, the README's table.

The installed scripts ``kvm-ifup`` and ``kvm-console-wrapper`` live in this
directory too (see :data:`ganeti_kvm.host.paths.KVM_IFUP`).
"""
