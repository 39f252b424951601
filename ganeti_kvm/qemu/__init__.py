"""QEMU itself: its capabilities, its command line, its log."""
