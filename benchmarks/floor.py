"""The "floor": a bare threaded fetch of an image's blobs, as a reference for this machine.

    python benchmarks/floor.py --dest DIR 127.0.0.1:5000/repo:tag [more refs ...]

Plain HTTP to loopback registries (HTTPS without certificate checks with ``--tls``),
anonymous, single-platform image manifests only. Manifests
are fetched first over one http.client connection; then one thread per unique blob (config and
layers, deduplicated across the refs) opens its own connection, reads the body in 1 MiB pieces
(``readinto`` one reused buffer), hashes them with hashlib.sha256 and os.write()s them to
``DIR/blobs/sha256/<hex>.part``;
after the last byte the digest and size are checked, the file is fsync'd (puller and skopeo
fsync too) and renamed to ``DIR/blobs/sha256/<hex>``. A blob already there with the right size is
skipped (the warm case). The manifests are written next to the blobs. Prints the manifest
digest of each ref on stdout; exits 1 on any failure.

No retries, no resume, no progress, no auth, no index handling: the cost of doing the work and
nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import sys
import threading

CHUNK = 1 << 20
ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
MAX_REDIRECTS = 3


def parse_ref(ref: str) -> tuple[str, str, str]:
    host, _, rest = ref.partition("/")
    if "@" in rest:
        repo, _, tag = rest.partition("@")
    else:
        repo, _, tag = rest.rpartition(":")
    return host, repo, tag


TLS = False  # --tls: HTTPS without certificate checks (the benchmark's self-signed registry)


def connect(host: str) -> http.client.HTTPConnection:
    if TLS:
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(host, timeout=60, context=ctx)
    return http.client.HTTPConnection(host, timeout=60)


def get(host: str, path: str, headers: dict, conn: http.client.HTTPConnection | None = None):
    """GET following up to MAX_REDIRECTS redirects; returns (conn, response) unread."""
    own = conn is None
    for _ in range(MAX_REDIRECTS + 1):
        if conn is None:
            conn = connect(host)
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        if resp.status in (301, 302, 303, 307, 308):
            loc = resp.getheader("Location", "")
            resp.read()
            if own or not loc.startswith("/"):
                conn.close()
                conn = None
            if loc.startswith(("http://", "https://")):
                host, _, p = loc.split("://", 1)[1].partition("/")
                path = "/" + p
            else:
                path = loc
            continue
        return conn, resp
    raise RuntimeError(f"too many redirects for {path}")


def fetch_blob(host: str, repo: str, digest: str, size: int, blob_dir: str,
               errors: list[str]) -> None:
    hexd = digest.split(":", 1)[1]
    final = os.path.join(blob_dir, hexd)
    try:
        conn, resp = get(host, f"/v2/{repo}/blobs/{digest}", {})
        try:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
            h = hashlib.sha256()
            tmp = final + ".part"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            got = 0
            # one reused 1 MiB buffer: a fresh 1 MiB bytes per read costs page faults (glibc
            # gives a thread arena's freed top back with madvise), about 2 s of sys per GiB
            buf = bytearray(CHUNK)
            mv = memoryview(buf)
            try:
                while True:  # bounded by the response length
                    n = resp.readinto(buf)
                    if not n:
                        break
                    h.update(mv[:n])
                    view = mv[:n]
                    while view:
                        view = view[os.write(fd, view):]
                    got += n
                if got != size or "sha256:" + h.hexdigest() != digest:
                    raise RuntimeError(f"got {got} bytes sha256:{h.hexdigest()}, "
                                       f"want {size} {digest}")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        finally:
            conn.close()
    except Exception as exc:  # noqa: BLE001 - reported and turned into exit 1
        errors.append(f"{digest}: {exc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", required=True)
    ap.add_argument("--tls", action="store_true", help="HTTPS, certificates not checked")
    ap.add_argument("refs", nargs="+")
    args = ap.parse_args(argv)
    global TLS
    TLS = args.tls

    blob_dir = os.path.join(args.dest, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    wanted: dict[str, tuple[str, str, int]] = {}  # digest -> (host, repo, size)
    conns: dict[str, http.client.HTTPConnection] = {}
    try:
        for ref in args.refs:
            host, repo, tag = parse_ref(ref)
            conn = conns.get(host)
            conn, resp = get(host, f"/v2/{repo}/manifests/{tag}", {"Accept": ACCEPT}, conn)
            conns[host] = conn
            body = resp.read()
            if resp.status != 200:
                print(f"floor: {ref}: manifest HTTP {resp.status}", file=sys.stderr)
                return 1
            mdigest = "sha256:" + hashlib.sha256(body).hexdigest()
            if "@" in ref and ref.rpartition("@")[2] != mdigest:
                print(f"floor: {ref}: manifest digest {mdigest}", file=sys.stderr)
                return 1
            man = json.loads(body)
            if "layers" not in man:
                print(f"floor: {ref}: not an image manifest", file=sys.stderr)
                return 1
            with open(os.path.join(blob_dir, mdigest.split(":", 1)[1]), "wb") as f:
                f.write(body)
            for d in [man["config"], *man["layers"]]:
                wanted.setdefault(d["digest"], (host, repo, int(d["size"])))
            print(f"{host}/{repo}@{mdigest}")
    finally:
        for c in conns.values():
            c.close()

    errors: list[str] = []
    threads = []
    for digest, (host, repo, size) in wanted.items():
        path = os.path.join(blob_dir, digest.split(":", 1)[1])
        try:
            if os.stat(path).st_size == size:
                continue
        except FileNotFoundError:
            pass
        t = threading.Thread(target=fetch_blob, args=(host, repo, digest, size, blob_dir, errors),
                             daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    sys.stdout.flush()
    for e in errors:
        print(f"floor: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
