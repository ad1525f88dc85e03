"""A model folder laid out as a hub download leaves it in the hub cache (no network in tests): blobs named by
their hash, a snapshot of links to them, and the ref naming the snapshot's commit."""
import hashlib
import os
from pathlib import Path


def publish(folder, repo_id: str, cache_dir, commit: str = "1" * 40) -> Path:
    """Put ``folder``'s files into the hub cache ``cache_dir`` as ``repo_id`` at ``commit`` (the ref ``main``);
    returns the snapshot folder."""
    root = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    snapshot = root / "snapshots" / commit
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs" / "main").write_text(commit)
    return snapshot
