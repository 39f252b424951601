"""Packaging for ganeti-kvm."""

import os
import re

from setuptools import find_packages, setup


def _version() -> str:
    """The version, from its one place: ``__version__`` in ganeti_kvm/__init__.py.

    Read as text (importing the package at build time is not needed);
    debian/changelog must carry the same (tests/test_deb.py checks it).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "ganeti_kvm", "__init__.py"), encoding="utf-8") as handle:
        found = re.search(r'^__version__ = "([^"]+)"$', handle.read(), re.MULTILINE)
    if found is None:
        raise SystemExit("setup.py: no __version__ = \"...\" line in ganeti_kvm/__init__.py")
    return found.group(1)


setup(
    name="ganeti-kvm",
    version=_version(),
    description="Run QEMU/KVM virtual machines for a cluster manager (Ganeti's KVM driver, "
                "for current QEMU)",
    license="GPL-2.0-or-later",
    python_requires=">=3.11",
    packages=find_packages(include=["ganeti_kvm", "ganeti_kvm.*"]),
    package_data={"ganeti_kvm": ["py.typed", "tools/*"]},
    include_package_data=True,
    extras_require={"test": ["pytest>=7", "mypy==2.4.1", "ruff==0.17.6"]},
    entry_points={"console_scripts": ["ganeti-kvm = ganeti_kvm.tools.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: GNU General Public License v2 or later (GPLv2+)",
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
    ],
)
