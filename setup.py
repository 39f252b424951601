"""Packaging for ganeti-kvm."""

from setuptools import find_packages, setup

setup(
    name="ganeti-kvm",
    version="0.1.0",
    description="Run QEMU/KVM virtual machines for a cluster manager (Ganeti's KVM driver, "
                "for current QEMU)",
    license="GPL-2.0-or-later",
    python_requires=">=3.11",
    packages=find_packages(include=["ganeti_kvm", "ganeti_kvm.*"]),
    package_data={"ganeti_kvm": ["py.typed", "tools/*"]},
    include_package_data=True,
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["ganeti-kvm = ganeti_kvm.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: GNU General Public License v2 or later (GPLv2+)",
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
    ],
)
