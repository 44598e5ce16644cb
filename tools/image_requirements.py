"""What a build on an NGC PyTorch image installs from requirements.txt, and whether the image's
Transformer Engine suits our megatron-core.

NGC PyTorch images (25.03 and newer) pin every preinstalled Python package with a pip constraint
file (``PIP_CONSTRAINT``, /etc/pip/constraint.txt). Our exact pins of packages the image already
has (pillow, pyyaml, pytest, tqdm, tensorboard, ...) would contradict it and make ``pip install``
fail. So the build keeps whatever the image has and installs only the missing packages, at our
pins, with the image's constraints in force. Two packages must be exactly ours, because the code
relies on their internals and classes: megatron-core and transformers; an image that holds other
versions of them stops the build with the reason. torch, numpy and DALI always stay the image's
(TE and Apex are built against them).

  python tools/image_requirements.py requirements.txt > /tmp/requirements.image.txt
  python tools/image_requirements.py --check-te      # after megatron-core is installed

Reports go to stderr; the requirements to install go to stdout. Transformer Engine imports only
with a GPU, so its version is read from its package metadata, and the accepted range is the one
megatron-core declares for it.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Optional

from packaging.requirements import Requirement
from packaging.version import Version

IMAGE_OWNED = ("torch", "numpy", "nvidia-dali")
"""Name prefixes of packages the image builds against each other: never installed by us."""
EXACT = ("megatron-core", "transformers")
"""Packages whose exact version the code needs (internals, model classes)."""
TE_DISTRIBUTIONS = ("transformer-engine", "transformer_engine", "transformer-engine-torch")
"""Names Transformer Engine's package goes by (NGC builds it from source)."""


def _norm(name: str) -> str:
    """PEP 503 normalized package name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str) -> list[tuple[str, str]]:
    """(name, version) of every ``name==version`` line of a requirements file."""
    pins = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            if "==" not in text:
                raise ValueError(f"{path}:{number}: expected name==version, got {text!r}")
            name, version = (part.strip() for part in text.split("==", 1))
            pins.append((name, version))
    return pins


def installed_version(name: str) -> Optional[str]:
    """Version of an installed distribution, None when absent."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class Plan:
    """What the build does with each pin."""

    install: list[str] = field(default_factory=list)
    """``name==version`` lines to install (absent from the image)."""
    kept: list[str] = field(default_factory=list)
    """Report lines: packages the image has, kept at its version."""
    errors: list[str] = field(default_factory=list)
    """Reasons the build cannot go on."""


def plan(pins: list[tuple[str, str]], installed: Callable[[str], Optional[str]]) -> Plan:
    """Split the pins into what to install and what the image already provides."""
    out = Plan()
    for name, version in pins:
        norm, have = _norm(name), installed(name)
        if norm.startswith(IMAGE_OWNED):
            out.kept.append(f"{name}: the image's build ({have or 'absent'}) stays")
        elif have is None:
            out.install.append(f"{name}=={version}")
        elif norm in EXACT and Version(have) != Version(version):
            out.errors.append(
                f"{name}: the image has {have}, the code needs exactly {version}; "
                "use a base image without it, or with that version"
            )
        else:
            note = "" if Version(have) == Version(version) else f" (requirements.txt: {version})"
            out.kept.append(f"{name}: the image's {have} kept{note}")
    return out


def te_version() -> Optional[str]:
    """Installed Transformer Engine version, from metadata (no import)."""
    for name in TE_DISTRIBUTIONS:
        version = installed_version(name)
        if version:
            return version
    return None


def te_requirement() -> Optional[Requirement]:
    """The transformer-engine requirement megatron-core declares (its "dev" extra)."""
    for line in metadata.requires("megatron-core") or []:
        req = Requirement(line)
        if _norm(req.name) == "transformer-engine":
            return req
    return None


def check_te(version: Optional[str], req: Optional[Requirement]) -> tuple[bool, str]:
    """(ok, reason): whether a TE version lies in megatron-core's declared range."""
    if version is None:
        return False, "Transformer Engine is not installed (the local spec will be used)"
    if req is None:
        return True, f"Transformer Engine {version}; megatron-core declares no range"
    ok = req.specifier.contains(Version(version).public, prereleases=True)
    verdict = "inside" if ok else "OUTSIDE"
    return ok, f"Transformer Engine {version} is {verdict} megatron-core's range {req.specifier}"


def main(argv: Optional[list[str]] = None) -> int:
    """Print the requirements to install (or check TE); non-zero exit on a conflict."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("requirements", nargs="?", help="requirements.txt with name==version lines")
    p.add_argument(
        "--check-te",
        action="store_true",
        help="check the installed Transformer Engine against megatron-core's range",
    )
    args = p.parse_args(argv)
    if args.check_te:
        ok, reason = check_te(te_version(), te_requirement())
        print(f"[image] {reason}", file=sys.stderr)
        return 0 if ok else 1
    if not args.requirements:
        p.error("give a requirements file or --check-te")
    result = plan(read_pins(args.requirements), installed_version)
    for line in result.kept:
        print(f"[image] {line}", file=sys.stderr)
    for line in result.install:
        print(f"[image] install {line}", file=sys.stderr)
        print(line)
    for line in result.errors:
        print(f"[image] ERROR {line}", file=sys.stderr)
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
