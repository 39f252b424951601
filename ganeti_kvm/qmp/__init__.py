"""QEMU's monitors: the QMP wire format, one client, batches, and HMP."""
