"""The offline demo behind `make demo`.

Starts the real distribution registry on a free loopback port, seeds a small
multi-platform image (three layers, two of them shared with a base image), pulls it
twice with the `puller` command line (the second pull shows "Already exists"), and
lets skopeo read the store. Everything lives under .demo/ and the registry is stopped
at the end.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.images import build_image, build_index, push  # noqa: E402
from tests.support.registry import Registry  # noqa: E402


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def sh(*cmd: str) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    work = ROOT / ".demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    store = work / "store"
    puller = [sys.executable, "-m", "puller"]
    with Registry(work / "registry") as reg:
        step(f"local registry (CNCF distribution) listening on {reg.url}")
        base = build_image(seed=7, layer_sizes=[6_000_000, 1_500_000])
        amd64 = build_image(seed=8, layer_sizes=[2_000_000], base=base)
        arm64 = build_image(seed=9, layer_sizes=[2_000_000], base=base,
                            platform=("linux", "arm64", "v8"))
        push(reg.url, "demo/app", "1.0", build_index([amd64, arm64]))
        push(reg.url, "demo/base", "latest", base)
        ref = f"{reg.host}/demo/app:1.0"
        step(f"seeded {ref}: an OCI index (linux/amd64, linux/arm64/v8, attestations)")

        step("first pull: every layer is downloaded, verified and stored")
        sh(*puller, "pull", "--store", str(store), "--platform", "linux/amd64", ref)
        step("second pull, plus the base image: nothing is downloaded again")
        sh(*puller, "pull", "--store", str(store), "--platform", "linux/amd64", ref,
           f"{reg.host}/demo/base")

        step("the store is an OCI image layout; skopeo reads it")
        skopeo = shutil.which("skopeo")
        if skopeo:
            sh(skopeo, "inspect", "--override-arch", "amd64", f"oci:{store}:{ref}")
        else:
            print("(skopeo is not installed; skipping)")
        step(f"store contents ({store})")
        for p in sorted(store.iterdir()):
            print(f"  {p.name}{'/' if p.is_dir() else ''}")
        print(f"  blobs/sha256/: {len(list((store / 'blobs' / 'sha256').iterdir()))} blobs")
    print("\nregistry stopped; the store stays in .demo/store", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
