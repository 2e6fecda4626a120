"""Commands that show and use what the store holds.

``add_parsers(sub)`` registers the subcommands on the command line's parser; each sets
``handler`` to a function taking the parsed arguments and returning an exit code.

========  =========================================================================
images    list the images in the store (``--json``, ``-q``, ``--no-trunc``, PATTERN)
inspect   manifest, config and layers of one image (``--raw``, ``--config``)
rmi       drop index entries (blobs go at the next ``puller gc``)
du        bytes per image, shared versus unique, unreferenced, partial downloads
save      write images to a docker-archive (``docker load``) or OCI layout tarball
unpack    extract an image's root filesystem into a directory
serve     serve the store as a read-only registry (optionally pull-through)
========  =========================================================================

Importing this module is cheap: each command imports its module when it runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

__all__ = ["add_parsers"]

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
_STORE_HELP = "store directory (default: $PULLER_STORE or ~/.cache/puller)"
_PLATFORM_HELP = ("image to use from a multi-platform entry (default: the only one in the "
                  "store, else this host's)")


def _run(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports ``puller.<module>`` only when the command runs and turns
    puller's errors into one line on stderr."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        from .errors import (InvalidDigest, InvalidPlatform, InvalidReference, PullerError)

        fn = getattr(importlib.import_module(f"puller.{module}"), name)
        try:
            return int(fn(args))
        except (InvalidReference, InvalidPlatform, InvalidDigest) as exc:
            print(f"puller: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except PullerError as exc:
            print(f"puller: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            print("puller: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except OSError as exc:
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            print(f"puller: {exc.strerror or exc}{where}", file=sys.stderr)
            return EXIT_FAILED

    return handler


def add_parsers(sub: Any) -> None:
    """Register images, inspect, rmi, du, save, unpack and serve."""
    p = sub.add_parser("images", help="list the images in the store",
                       description="List the store's images: reference, digest, platforms, "
                       "size (compressed, as stored) and when they were pulled.")
    p.add_argument("pattern", nargs="?", metavar="PATTERN",
                   help="only references matching this (a reference or a shell pattern)")
    p.add_argument("--store", metavar="DIR", help=_STORE_HELP)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per image")
    out.add_argument("-q", "--quiet", action="store_true", help="only the references")
    p.add_argument("--no-trunc", action="store_true", help="show full digests and every platform")
    p.set_defaults(handler=_run("inventory", "_images_command"))

    p = sub.add_parser("inspect", help="show an image's manifest, config and layers",
                       description="Show what the store holds for REF as JSON: the manifest "
                       "or index, and for each platform image its config and layers.")
    p.add_argument("ref", metavar="REF", help="reference, or the digest of an entry")
    p.add_argument("--store", metavar="DIR", help=_STORE_HELP)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--raw", action="store_true",
                      help="print the exact stored manifest bytes (of the index, or with "
                      "--platform of that platform's manifest)")
    what.add_argument("--config", action="store_true",
                      help="print the exact config bytes of one platform image")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help=_PLATFORM_HELP)
    p.set_defaults(handler=_run("inventory", "_inspect_command"))

    p = sub.add_parser("rmi", help="remove images from the store's index",
                       description="Drop the index entries of REFs. Their blobs stay until "
                       "the next `puller gc` removes those no other image uses.")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.add_argument("--store", metavar="DIR", help=_STORE_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no hint about gc")
    p.set_defaults(handler=_run("inventory", "_rmi_command"))

    p = sub.add_parser("du", help="show the store's disk usage",
                       description="Bytes per image, split into bytes only it uses and "
                       "bytes it shares with other images; unreferenced blobs and partial "
                       "downloads.")
    p.add_argument("--store", metavar="DIR", help=_STORE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_run("inventory", "_du_command"))

    p = sub.add_parser("save", help="write images to a tar archive (docker load, OCI)",
                       description="Write REFs to a tar archive: a docker-archive that "
                       "`docker load` and `skopeo ... docker-archive:FILE` read, or with "
                       "--format oci an OCI image layout (`oci-archive:FILE`).")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="archive to write (default: standard output, if not a terminal)")
    p.add_argument("--format", choices=("docker", "oci"), default="docker",
                   help="docker-archive (default) or OCI image layout")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help=_PLATFORM_HELP)
    p.add_argument("--uncompressed", action="store_true",
                   help="docker format: write layers as plain tars, like `docker save` "
                   "(zstd layers are always written uncompressed)")
    p.add_argument("--store", metavar="DIR", help=_STORE_HELP)
    p.set_defaults(handler=_run("archive", "save_command"))

    p = sub.add_parser("unpack", help="extract an image's root filesystem",
                       description="Extract REF's root filesystem into DIR (new or empty), "
                       "applying its layers in order with OCI whiteouts. Nothing is ever "
                       "written outside DIR.")
    p.add_argument("ref", metavar="REF")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help=_PLATFORM_HELP)
    p.add_argument("--no-chown", action="store_true",
                   help="keep files owned by the caller (the default when not root)")
    p.add_argument("--store", metavar="DIR", help=_STORE_HELP)
    p.set_defaults(handler=_run("unpack", "unpack_command"))

    p = sub.add_parser("serve", help="serve the store as a read-only registry",
                       description="Serve the stored images over the registry API "
                       "(/v2/). docker.io/library/alpine:latest is served as "
                       "library/alpine:latest; images from other registries as "
                       "HOST/PATH, with HOST's ':' written '_' (127.0.0.1:5000/team/api is "
                       "served as 127.0.0.1_5000/team/api).")
    p.add_argument("--addr", default="127.0.0.1:5000", metavar="HOST:PORT",
                   help="address to listen on (default: 127.0.0.1:5000; port 0 picks one)")
    p.add_argument("--store", metavar="DIR", help=_STORE_HELP)
    p.add_argument("--upstream", action="store_true",
                   help="pull-through: pull manifests missing from the store from the "
                   "registry their path names (docker.io for plain paths)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="with --upstream: platform to pull of a multi-platform image "
                   "(default: this host's; misses of other platforms are pulled by digest)")
    p.add_argument("--all-platforms", action="store_true",
                   help="with --upstream: pull every platform of a multi-platform image")
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate")
    p.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert")
    from .cli import _add_network_options

    _add_network_options(p)
    p.set_defaults(handler=_run("serve", "serve_command"))
