"""A corpus several times the embedded one, for GPU runs that should train to their deadline.

On an H200 the embedded corpus (1.3M unique training tokens) is used up in under two minutes:
`pipeline.autotune --minutes 10` stopped at 117 s, data-limited (session 17,
`benchmarks/notes/gpu_autotune.md`). The lent GPU machine has no network, so a larger corpus is
built here, where Debian's package archive is reachable, and carried to it as one Parquet file:

    python -m benchmarks.gpu_data                     # .gpu-data/docs.parquet
    run(command="AUTOTUNE_DATA=.gpu-data/docs.parquet bash benchmarks/gpu.sh <commit> autotune",
        carry=[".gpu-site", ".gpu-data"])   # 43 + 13 MiB of the 64 a call carries; no .whl needed

The text: the reStructuredText sources of the Linux kernel's documentation (Debian's
linux-doc-6.1, GPL-2.0) and of Python's (python3.11-doc, PSF licence), as Sphinx ships them
under `html/_sources`, translations left out: about 32 MB of English prose about software, one
document per source file, in path order, so the file is the same on every build of the same
package versions. It is any user's `--data` route (a local Parquet file with a `text` column).
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import tempfile
from pathlib import Path

PACKAGES = ("linux-doc-6.1", "python3.11-doc")
OUT = Path(".gpu-data") / "docs.parquet"


def documents(root: Path) -> list[tuple[str, str]]:
    """(path, text) for every Sphinx source under `root`, English only, in path order."""
    out = []
    for f in sorted(root.glob("**/html/_sources/**/*.txt")):
        rel = f.relative_to(root).as_posix()
        if "/translations/" in rel:
            continue
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            out.append((rel, text))
    return out


def build(out: Path = OUT, packages=PACKAGES, debs: list[Path] | None = None) -> dict:
    """Download (or take) the packages, unpack them and write their sources as one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not debs:
            subprocess.run(["apt-get", "download", *packages], cwd=tmp, check=True, capture_output=True)
            debs = sorted(tmp.glob("*.deb"))
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
        docs = documents(tmp / "root")
        versions = [Path(d).name for d in debs]
    if not docs:
        raise SystemExit(f"error: no Sphinx sources found in {versions}; check the package names")
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"text": [t for _, t in docs], "source": [p for p, _ in docs]})
    pq.write_table(table, out, compression="zstd")
    text_bytes = sum(len(t.encode()) for _, t in docs)
    return {"file": str(out), "packages": versions, "documents": len(docs), "text_bytes": text_bytes,
            "file_bytes": out.stat().st_size, "sha256": hashlib.sha256(out.read_bytes()).hexdigest()[:16]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="build the larger corpus GPU runs carry (.gpu-data/docs.parquet)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--deb", type=Path, action="append", help="use these .deb files instead of downloading")
    a = ap.parse_args()
    info = build(a.out, debs=a.deb)
    print(f"{info['file']}: {info['documents']:,} documents, {info['text_bytes'] / 1e6:.1f} MB of text, "
          f"{info['file_bytes'] / 2**20:.1f} MiB on disk, sha256 {info['sha256']} ({', '.join(info['packages'])})")
