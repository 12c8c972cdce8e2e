"""Logits a stage computed for the fidelity report, kept on disk so that an interrupted report loses nothing.

``WORKDIR/fidelity_logits_bs{N}/<stage>/`` holds ``record.json`` (what made the logits: the
model's content digest, the engine and precision, the input batches' names, sizes and mtimes
with the manifest's fingerprint) and chunks ``chunk_NNNNN.npz`` of (image names, float32
logits), each written atomically once CHUNK_IMAGES images are done.  A store is used only while
its record matches exactly; otherwise its chunks are deleted before anything is computed.  A
rerun of the same report (or a screened report after a brute-force one) reads what is there
and runs only the rest.  Nothing here is needed for correctness: deleting the folder costs only
time.
"""

import io
import json
import logging
import os
import re

import numpy as np

from beit_pipeline import files

log = logging.getLogger(__name__)

RECORD_NAME = "record.json"
STORE_FORMAT = 1
CHUNK_IMAGES = 256  # 1 MB of logits: a kill loses at most this many images' work
_CHUNK_RE = re.compile(r"^chunk_(\d{5,})\.npz$")


class LogitStore:
    """One stage's logits of some images, valid while ``key`` equals the folder's record."""

    def __init__(self, folder: str, key: dict, fresh: bool = False):
        self.folder, self.key = folder, {"format": STORE_FORMAT, **key}
        self.fresh = fresh
        self.pending_names, self.pending_rows = [], []
        self.next_chunk = 0

    def load(self) -> dict:
        """{image name: logits row} of what a matching earlier run kept; clears a store of other inputs."""
        os.makedirs(self.folder, exist_ok=True)
        files.remove_stale_temporaries(self.folder)
        chunks = sorted(n for n in os.listdir(self.folder) if _CHUNK_RE.match(n))
        record = files.read_json(os.path.join(self.folder, RECORD_NAME))
        if self.fresh or record != self.key:
            if chunks:
                why = "--fresh" if self.fresh else "what made them changed"
                log.info(f"{self.folder}: deleting {len(chunks)} chunks of logits ({why})")
            self._clear(chunks)
            files.write_json_atomic(os.path.join(self.folder, RECORD_NAME), self.key)
            return {}
        found = {}
        for name in chunks:
            found.update(self._read(os.path.join(self.folder, name)))
        self.next_chunk = 1 + max((int(_CHUNK_RE.match(n).group(1)) for n in chunks), default=-1)
        return found

    def add(self, names: list, rows: np.ndarray) -> None:
        """Keep these images' logits; written out once CHUNK_IMAGES are waiting (and by flush())."""
        self.pending_names.extend(names)
        self.pending_rows.extend(np.asarray(rows, np.float32))
        if len(self.pending_names) >= CHUNK_IMAGES:
            self.flush()

    def flush(self) -> None:
        if not self.pending_names:
            return
        path = os.path.join(self.folder, f"chunk_{self.next_chunk:05d}.npz")
        names = json.dumps(self.pending_names, ensure_ascii=True).encode("ascii")
        buf = io.BytesIO()
        np.savez(buf, logits=np.stack(self.pending_rows), names=np.frombuffer(names, np.uint8))
        files.write_bytes_atomic(path, buf.getvalue())
        self.next_chunk += 1
        self.pending_names, self.pending_rows = [], []

    def _clear(self, chunks):
        for name in chunks:
            os.unlink(os.path.join(self.folder, name))

    @staticmethod
    def _read(path):
        try:
            with np.load(path, allow_pickle=False) as data:
                names = json.loads(data["names"].tobytes().decode("ascii"))
                logits = np.asarray(data["logits"], np.float32)
        except (OSError, ValueError, KeyError) as exc:  # a damaged chunk: recompute its images
            log.warning(f"{path}: unreadable ({exc}); its images are computed again")
            return {}
        return dict(zip(names, logits))
