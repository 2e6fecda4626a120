"""Platforms (``linux/arm64/v8``): parsing, containerd-like normalisation and matching."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeVar

from puller.digest import _preview
from puller.errors import InvalidPlatform, NoMatchingPlatform
from puller.record import Record

__all__ = ["Platform", "normalize_arch", "normalize_os", "candidates", "select", "is_unknown"]

T = TypeVar("T")

# containerd's specifier charset plus '.', which real variants ("v8.2") use.
_COMPONENT = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
# os.version is free-form ("10.0.20348.1726"); keep it printable so messages stay one line.
_OS_VERSION = re.compile(r"[\x21-\x7e]{1,128}")
_KNOWN_OS = frozenset({
    "aix", "android", "darwin", "dragonfly", "freebsd", "hurd", "illumos", "ios", "js",
    "linux", "nacl", "netbsd", "openbsd", "plan9", "solaris", "wasip1", "windows", "zos",
})
_KNOWN_ARCH = frozenset({
    "386", "amd64", "amd64p32", "arm", "armbe", "arm64", "arm64be", "loong64", "mips",
    "mips64", "mips64le", "mips64p32", "mips64p32le", "mipsle", "ppc", "ppc64", "ppc64le",
    "riscv", "riscv64", "s390", "s390x", "sparc", "sparc64", "wasm",
    # aliases normalize_arch understands
    "i386", "i686", "x86_64", "x86-64", "aarch64", "armhf", "armel",
})
_UNKNOWN = "unknown"
# Cap the "available:" list so a hostile index can't produce a megabyte-long message.
_MAX_LISTED = 24


def normalize_os(os: str) -> str:
    """Lower-case the OS name; ``macos`` is darwin as in containerd."""
    os = os.lower()
    return "darwin" if os == "macos" else os


def normalize_arch(arch: str, variant: str | None) -> tuple[str, str | None]:
    """Canonical (architecture, variant) as containerd spells them.

    Unlike containerd, arm64 keeps an explicit ``v8`` variant so that ``str()`` reads
    ``linux/arm64/v8`` like docker's output.
    """
    arch = arch.lower()
    variant = variant.lower() if variant else None
    if arch in ("i386", "i686", "386"):
        return "386", None
    if arch in ("x86_64", "x86-64", "amd64"):
        # v1 is the baseline every amd64 CPU has, so it is the same as no variant.
        return "amd64", None if variant in (None, "v1", "1") else variant
    if arch in ("aarch64", "arm64"):
        if variant in (None, "8", "v8", "v8.0"):
            return "arm64", "v8"
        if variant in ("9", "9.0", "v9.0"):
            return "arm64", "v9"
        return "arm64", variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in (None, "7"):
            return "arm", "v7"
        if variant in ("5", "6", "8"):
            return "arm", "v" + variant
        return "arm", variant
    return arch, variant


def _check(value: object, what: str, pattern: re.Pattern[str] = _COMPONENT) -> str:
    if not isinstance(value, str):
        raise InvalidPlatform(f"platform {what} must be a string, got {_preview(value)}")
    if not pattern.fullmatch(value):
        raise InvalidPlatform(f"invalid platform {what} {_preview(value)}")
    return value


class Platform(Record):
    """An OS/architecture/variant triple, always stored normalised when built by this module."""

    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    @classmethod
    def parse(cls, s: str) -> Platform:
        """Parse ``os[/arch[/variant]]`` (or a bare arch, meaning linux); normalised."""
        if not isinstance(s, str):
            raise InvalidPlatform(f"platform must be a string, got {_preview(s)}")
        parts = s.split("/")
        if not s or len(parts) > 3 or not all(_COMPONENT.fullmatch(p) for p in parts):
            raise InvalidPlatform(f"invalid platform {_preview(s)}: expected "
                                  "os/arch[/variant], e.g. linux/arm64/v8")
        if len(parts) == 1:
            only = parts[0].lower()
            if only in _KNOWN_OS or only == "macos":
                # "linux" alone means this machine's architecture, like containerd.
                host = cls.host()
                return cls(normalize_os(only), host.architecture, host.variant)
            if only in _KNOWN_ARCH:
                arch, variant = normalize_arch(only, None)
                return cls("linux", arch, variant)
            raise InvalidPlatform(f"invalid platform {_preview(s)}: unknown OS or architecture")
        arch, variant = normalize_arch(parts[1], parts[2] if len(parts) == 3 else None)
        return cls(normalize_os(parts[0]), arch, variant)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Platform:
        """From an OCI descriptor ``platform`` object; normalised. Raises InvalidPlatform."""
        if not isinstance(obj, dict):
            raise InvalidPlatform(f"platform must be a JSON object, got {_preview(obj)}")
        if "os" not in obj or "architecture" not in obj:
            raise InvalidPlatform("platform object needs both 'os' and 'architecture'")
        os = _check(obj["os"], "os")
        arch = _check(obj["architecture"], "architecture")
        raw_variant = obj.get("variant")
        # Some tools write "variant": "" for none; treat it as absent.
        variant = _check(raw_variant, "variant") if raw_variant not in (None, "") else None
        raw_version = obj.get("os.version")
        os_version = (_check(raw_version, "os.version", _OS_VERSION)
                      if raw_version not in (None, "") else None)
        arch, variant = normalize_arch(arch, variant)
        return cls(normalize_os(os), arch, variant, os_version)

    @classmethod
    def host(cls) -> Platform:
        """The platform to pull for on this machine (always linux: images are linux)."""
        import platform as _stdlib_platform  # lazily: only needed for defaults

        machine = _stdlib_platform.machine().lower()
        if machine.startswith("armv") and len(machine) > 4 and machine[4].isdigit():
            # armv7l -> arm/v7, armv6l -> arm/v6, armv5tel -> arm/v5, armv8l -> arm/v8
            return cls("linux", *normalize_arch("arm", machine[4]))
        if machine == "arm":
            return cls("linux", *normalize_arch("arm", None))
        if machine in ("x86", "i486", "i586", "i686"):
            machine = "386"
        if machine in ("ppc64el",):
            machine = "ppc64le"
        return cls("linux", *normalize_arch(machine or "amd64", None))

    def __str__(self) -> str:
        out = f"{self.os}/{self.architecture}"
        return f"{out}/{self.variant}" if self.variant else out

    def to_json(self) -> dict[str, str]:
        """OCI ``platform`` object with only the fields that are set."""
        out = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.variant:
            out["variant"] = self.variant
        return out


def is_unknown(p: Platform | None) -> bool:
    """True for no platform or BuildKit's ``unknown/unknown`` (attestation/builder entries)."""
    return p is None or p.os == _UNKNOWN or p.architecture == _UNKNOWN


def _variant_number(variant: str | None, prefix: str = "v") -> int | None:
    if variant and variant.startswith(prefix) and variant[len(prefix):].isdigit():
        return int(variant[len(prefix):])
    return None


def candidates(want: Platform) -> list[Platform]:
    """Platforms that can run on ``want``, best first (containerd's ordering).

    arm/vN also accepts older arm variants down to v5; amd64/vN accepts lower
    micro-architecture levels and plain amd64; arm64 accepts a variant-less entry.
    32-bit fallbacks (arm64 -> arm, amd64 -> 386) are deliberately not offered: docker
    refuses rather than silently pulling a 32-bit image.
    """
    os, arch, variant = want.os, want.architecture, want.variant
    out = [Platform(os, arch, variant)]
    number = _variant_number(variant)
    if arch == "arm" and number is not None:
        out += [Platform(os, "arm", f"v{n}") for n in range(number - 1, 4, -1)]
    elif arch == "amd64" and number is not None:
        out += [Platform(os, "amd64", f"v{n}") for n in range(number - 1, 1, -1)]
        out.append(Platform(os, "amd64", None))
    elif arch == "arm64":
        if number is not None and number > 8:
            out.append(Platform(os, "arm64", "v8"))
        if variant is not None:
            out.append(Platform(os, "arm64", None))
    return out


def select(entries: Sequence[tuple[Platform | None, T]], want: Platform) -> T:
    """The value of the entry that best matches ``want``; first listed wins ties.

    Entries without a platform or with ``unknown`` OS/architecture never match.
    Raises NoMatchingPlatform listing what is available.
    """
    # os_version is ignored: puller pulls linux images, where it is never set.
    keyed = [((p.os, p.architecture, p.variant), value)
             for p, value in entries if p is not None and not is_unknown(p)]
    for c in candidates(want):
        key = (c.os, c.architecture, c.variant)
        for k, value in keyed:
            if k == key:
                return value
    # dict as an ordered set: keeps first-seen order, linear for big indexes.
    available = list(dict.fromkeys(
        str(p) for p, _ in entries if p is not None and not is_unknown(p)))
    listed = ", ".join(available[:_MAX_LISTED]) or "none"
    if len(available) > _MAX_LISTED:
        listed += f", ... ({len(available) - _MAX_LISTED} more)"
    raise NoMatchingPlatform(f"no image for {want} in index; available: {listed}")
