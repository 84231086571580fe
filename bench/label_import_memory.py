"""Memory and time of `lesion labels import` by file size: a tiny file, an 8 MB file (it once took 2.2 GB and
56 s) and one just under the size cap (label_import.MAX_BYTES), each imported on SQLite in a fresh home by a child
process whose peak RSS is read from its own rusage (os.wait4). Most rows name images that were never ingested
(rejected unknown_image, still decided and logged); the first 1,000 name image rows inserted beforehand (imported).
Prints one JSON object per file.

    .venv/bin/python bench/label_import_memory.py [--sizes tiny,8mb,cap]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lesion_tasks.ingest.label_import import MAX_BYTES  # noqa: E402

KNOWN = 1000
ROW = "ISIC_{:08d},{},histopathology\n"  # 31 bytes a row


def _write(path: Path, size: int) -> int:
    """A labels file of about `size` bytes (at most MAX_BYTES); its number of rows."""
    rows = max(1, (min(size, MAX_BYTES) - 40) // len(ROW.format(0, "MEL")))
    with open(path, "w") as fh:
        fh.write("image_id,diagnosis,label_source\n")
        step = 100_000
        for start in range(0, rows, step):
            fh.write("".join(ROW.format(i, "MEL" if i % 4 == 0 else "NV") for i in range(start, min(rows, start + step))))
    return rows


def child(path: str, home: str) -> None:
    """In the measured process: a fresh SQLite home with KNOWN image rows, then the import."""
    from lesion_tasks.core import db
    from lesion_tasks.core.schema import drops, images
    from lesion_tasks.core.settings import Settings
    from lesion_tasks.ingest.label_import import import_labels

    settings = Settings.from_env({"LESION_HOME": home})
    db.upgrade(settings)
    now = datetime.now(UTC)
    engine = db.make_engine(settings.db_url)
    with engine.begin() as conn:
        conn.execute(drops.insert(), [{"drop_id": "d", "source": "s", "layout": "folder", "fingerprint": "f",
                                       "status": "complete", "n_entries": KNOWN, "started_at": now}])
        conn.execute(images.insert(), [
            {"image_id": f"ISIC_{i:08d}", "drop_id": "d", "source_entry": str(i), "sha256": str(i),
             "near_dup_group": str(i), "phash": "0", "width": 1, "height": 1, "n_bytes": 1, "format": "JPEG",
             "original_uri": "o", "normalized_uri": "n", "normalized_size": 1, "ingested_at": now} for i in range(KNOWN)])
    engine.dispose()
    started = time.perf_counter()
    result = import_labels(path, settings)
    print(json.dumps({"imported": result["imported"], "rejected": result["rejected"],
                      "import_seconds": round(time.perf_counter() - started, 2)}))


def measure(name: str, size: int, tmp: Path) -> dict:
    path = tmp / f"{name}.csv"
    rows = _write(path, size)
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(path), str(tmp / f"home-{name}")],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the import of {path} failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return {"file": name, "rows": rows, "bytes": path.stat().st_size, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "seconds": result["import_seconds"], "imported": result["imported"], "rejected": result["rejected"],
            "max_bytes": MAX_BYTES}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,8mb,cap")
    sizes = {"tiny": 4096, "8mb": 8 * 10**6, "cap": MAX_BYTES - 2**20}
    with tempfile.TemporaryDirectory(prefix="lesion-bench-labels-") as tmp:
        for name in parser.parse_args().sizes.split(","):
            print(json.dumps(measure(name, sizes[name], Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
