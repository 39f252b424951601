"""The node's operating system: TAP devices, the ifup hook, uids, /proc, locks, paths, files."""
