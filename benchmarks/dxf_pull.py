"""Pull images' blobs with python-dxf, the way a script using that library would.

    benchmarks/.work/dxf-venv/bin/python benchmarks/dxf_pull.py --dest DIR HOST/REPO:TAG ...

Runs in its own venv (``python -m venv benchmarks/.work/dxf-venv && .../pip install
python-dxf``). For each ref: ``DXF.get_manifest_and_response`` (plain HTTP, anonymous), then
``DXF.pull_blob`` for the config and every layer, one after another (python-dxf has no parallel
download of its own), 1 MiB chunks -- python-dxf checks each blob's sha256 as it streams -- into
``DIR/blobs/sha256/<hex>`` (fsync'd, renamed into place; blobs already present with the right
size are skipped). Prints ``HOST/REPO@<manifest digest>`` per ref.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from dxf import DXF

CHUNK = 1 << 20


def pull_blob(dxf: DXF, digest: str, size: int, blob_dir: str) -> None:
    final = os.path.join(blob_dir, digest.split(":", 1)[1])
    try:
        if os.stat(final).st_size == size:
            return
    except FileNotFoundError:
        pass
    tmp = final + ".part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in dxf.pull_blob(digest, chunk_size=CHUNK):  # raises on digest mismatch
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dest", required=True)
    ap.add_argument("refs", nargs="+")
    args = ap.parse_args()
    blob_dir = os.path.join(args.dest, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    for ref in args.refs:
        host, _, rest = ref.partition("/")
        repo, _, tag = rest.rpartition(":")
        dxf = DXF(host, repo, insecure=True, timeout=120)
        _, resp = dxf.get_manifest_and_response(tag)
        body = resp.content
        mdigest = "sha256:" + hashlib.sha256(body).hexdigest()
        with open(os.path.join(blob_dir, mdigest.split(":", 1)[1]), "wb") as f:
            f.write(body)
        man = json.loads(body)
        for d in [man["config"], *man["layers"]]:
            pull_blob(dxf, d["digest"], int(d["size"]), blob_dir)
        print(f"{host}/{repo}@{mdigest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
