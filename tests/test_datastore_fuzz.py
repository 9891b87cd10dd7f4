"""A structured fuzzer for the datastore file format: mutants that pass the checksums, so that the loader's
bounds and the automaton's invariants, not the CRCs, are what stands between a crafted file and the process.

:class:`DatastoreFile` knows the layout (``cpp/include/rasd/datastore_file.h``): the 512-byte header, the
section table and the eight arrays. Each case mutates header fields, section offsets and sizes, or the
automaton's arrays (links, lengths, edge offsets, edge tokens and targets, counts), recomputes the header
and section CRCs (or, for byte flips, leaves them stale), then loads the file and queries it in a worker
process that runs many cases (a Python process importing rasd takes seconds to start). Outcomes per case:
a clean error, the correct answers, different answers (silently wrong), a crash (the worker died) or a hang
(no answer within the timeout; the worker is killed and restarted after that case).

    python -m pytest tests/test_datastore_fuzz.py      # CI: a few hundred cases, checksums on and off
    bash scripts/fuzz.sh 5000                           # more
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

HEADER_BYTES = 512
SECTIONS = ("tokens", "doc_starts", "len", "link", "count", "edge_offsets", "edge_tokens", "edge_targets")
DTYPES = {
    "tokens": np.int32,
    "doc_starts": np.int64,
    "len": np.int32,
    "link": np.int32,
    "count": np.int64,
    "edge_offsets": np.int64,
    "edge_tokens": np.int32,
    "edge_targets": np.int32,
}
# name: (byte offset, struct format) of the header fields before the section table.
FIELDS = {
    "version": (8, "<I"),
    "header_bytes": (12, "<I"),
    "file_bytes": (16, "<Q"),
    "vocab_size": (24, "<q"),
    "num_tokens": (32, "<q"),
    "num_docs": (40, "<q"),
    "num_states": (48, "<q"),
    "num_edges": (56, "<q"),
}
TABLE = 256  # section table: 8 x {u64 offset, u64 bytes, u32 crc, u32 reserved}
CRC_AT = HEADER_BYTES - 4
ALIGN = 64


@dataclass
class DatastoreFile:
    """A datastore file as a mutable header plus arrays; :meth:`write` lays it out again."""

    header: bytearray
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | os.PathLike) -> DatastoreFile:
        raw = Path(path).read_bytes()
        header = bytearray(raw[:HEADER_BYTES])
        arrays = {}
        for i, name in enumerate(SECTIONS):
            offset, nbytes, _crc, _ = struct.unpack_from("<QQII", header, TABLE + 24 * i)
            arrays[name] = np.frombuffer(raw[offset : offset + nbytes], dtype=DTYPES[name]).copy()
        return cls(header, arrays)

    def get(self, name: str) -> int:
        at, fmt = FIELDS[name]
        return struct.unpack_from(fmt, self.header, at)[0]

    def set(self, name: str, value: int) -> None:
        at, fmt = FIELDS[name]
        struct.pack_into(fmt, self.header, at, value)

    def array(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def section(self, i: int) -> list[int]:
        return list(struct.unpack_from("<QQII", self.header, TABLE + 24 * i))

    def set_section(self, i: int, offset: int, nbytes: int) -> None:
        crc, reserved = struct.unpack_from("<II", self.header, TABLE + 24 * i + 16)
        struct.pack_into("<QQII", self.header, TABLE + 24 * i, offset, nbytes, crc, reserved)

    def encode(self, *, relayout: bool = True, fix_crcs: bool = True) -> bytes:
        """The file's bytes. ``relayout``: place the arrays anew and record their offsets, sizes and the
        file size (False: at the offsets the header records, whatever it says about sizes); ``fix_crcs``:
        recompute every section CRC and the header CRC, so the checksums pass whatever else was mutated."""
        header = self.header
        blobs = [self.arrays[name].tobytes() for name in SECTIONS]
        if relayout:
            pos = HEADER_BYTES
            for i, blob in enumerate(blobs):
                pos = (pos + ALIGN - 1) // ALIGN * ALIGN
                self.set_section(i, pos, len(blob))
                pos += len(blob)
            self.set("file_bytes", pos)
        size = max([HEADER_BYTES] + [self.section(i)[0] + len(b) for i, b in enumerate(blobs)])
        out = bytearray(size)
        for i, blob in enumerate(blobs):
            offset = self.section(i)[0]
            out[offset : offset + len(blob)] = blob
            if fix_crcs:
                struct.pack_into("<I", header, TABLE + 24 * i + 16, zlib.crc32(blob))
        if fix_crcs:
            struct.pack_into("<I", header, CRC_AT, zlib.crc32(bytes(header[:CRC_AT])))
        out[:HEADER_BYTES] = header
        return bytes(out)

    def write(self, path: str | os.PathLike, **kw: bool) -> None:
        Path(path).write_bytes(self.encode(**kw))


HUGE = (1 << 62, (1 << 62) + 1, (1 << 63) - 1, -1, -(1 << 62), 2**31, 2**32 + 5)


def mutate(base: DatastoreFile, rng: np.random.Generator) -> tuple[str, bytes]:
    """One mutant of ``base``: (kind, file bytes)."""
    f = DatastoreFile(bytearray(base.header), {k: v.copy() for k, v in base.arrays.items()})
    kind = rng.choice(
        [
            "header",
            "wrap",
            "section",
            "link",
            "len",
            "edge_offsets",
            "edge_tokens",
            "edge_targets",
            "count",
            "flip",
        ]
    )
    if kind == "wrap":
        # A count whose section size wraps around 2^64 to the real size, with everything that must agree
        # with it adjusted (the edge offsets' last entry for num_edges): every size check passes.
        name = rng.choice(["num_edges", "num_docs", "num_tokens", "num_states"])
        item = {"num_edges": 4, "num_docs": 8, "num_tokens": 4, "num_states": 8}[name]
        wrapped = f.get(name) + (1 << 64) // item
        f.set(name, wrapped % (1 << 63))
        if name == "num_edges":
            f.array("edge_offsets")[-1] = wrapped % (1 << 63)
            if rng.random() < 0.5:  # and a state in the middle pointing far past the real edges
                offsets = f.array("edge_offsets")
                offsets[int(rng.integers(1, len(offsets) - 1)) :] = wrapped % (1 << 63)
        return f"header:wrap:{name}", f.encode(relayout=False, fix_crcs=True)
    if kind == "header":
        name = rng.choice(list(FIELDS))
        choices = [*HUGE, 0, 1, f.get(name) + 1, f.get(name) - 1, int(rng.integers(0, 1 << 20))]
        value = int(rng.choice(choices))
        at, fmt = FIELDS[name]
        try:
            struct.pack_into(fmt, f.header, at, value)
        except struct.error:
            struct.pack_into(fmt, f.header, at, 0)
        # Counts: keep the arrays, recompute CRCs only (the header now disagrees with the sections).
        return f"header:{name}", f.encode(relayout=name != "file_bytes", fix_crcs=True)
    if kind == "section":
        data = f.encode()
        f = DatastoreFile.read_bytes(data)
        i = int(rng.integers(0, len(SECTIONS)))
        offset, nbytes, _, _ = f.section(i)
        which = rng.choice(["offset", "bytes", "both"])
        if which in ("offset", "both"):
            offset = int(
                rng.choice([*(h & ((1 << 64) - 1) for h in HUGE), 0, 8, offset + 8, offset - 8, 511])
            )
        if which in ("bytes", "both"):
            nbytes = int(
                rng.choice([*(h & ((1 << 64) - 1) for h in HUGE), 0, nbytes + 4, max(nbytes - 4, 0)])
            )
        f.set_section(i, offset % (1 << 64), nbytes % (1 << 64))
        header = f.header
        struct.pack_into("<I", header, CRC_AT, zlib.crc32(bytes(header[:CRC_AT])))
        return f"section:{SECTIONS[i]}:{which}", bytes(header) + data[HEADER_BYTES:]
    if kind == "flip":
        data = bytearray(base.encode())
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(HEADER_BYTES, len(data)))] ^= 1 << int(rng.integers(0, 8))
        return "flip", bytes(data)  # stale CRCs: only a checksum can catch it
    name = {"edge_offsets": "edge_offsets", "count": "count"}.get(kind, kind)
    arr = f.array(name)
    if len(arr):
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, len(arr)))
            info = np.iinfo(arr.dtype)
            candidates = [-1, 0, 1, i, i + 1, len(arr), len(arr) + 7, info.max, info.min, int(arr[i]) + 1]
            if name == "link":
                candidates += [int(arr[int(rng.integers(0, len(arr)))])]  # a link elsewhere: cycles
            arr[i] = int(rng.choice(candidates))
    return f"array:{name}", f.encode()


def _read_bytes(data: bytes) -> DatastoreFile:
    header = bytearray(data[:HEADER_BYTES])
    arrays = {}
    for i, name in enumerate(SECTIONS):
        offset, nbytes, _crc, _ = struct.unpack_from("<QQII", header, TABLE + 24 * i)
        arrays[name] = np.frombuffer(data[offset : offset + nbytes], dtype=DTYPES[name]).copy()
    return DatastoreFile(header, arrays)


DatastoreFile.read_bytes = staticmethod(_read_bytes)  # type: ignore[attr-defined]

# The worker: loads and queries each case file it is told about, one JSON line per case.
WORKER = r"""
import json, sys
import numpy as np
from rasd import Datastore
contexts = json.loads(sys.argv[1])
mode = sys.argv[2]
for line in sys.stdin:
    path = line.strip()
    print(json.dumps({"start": path}), flush=True)
    try:
        store = Datastore.load(path, verify=mode != "off")
        if mode == "full":
            store.check_integrity(progress=False)
        answers = []
        for ctx in contexts:
            m = store.matcher()
            m.feed(ctx)
            tree = m.retrieve(32, 8, score="count")
            answers.append([m.length, tree.tokens.tolist(), tree.parents.tolist(), tree.scores.tolist()])
        result = {"outcome": "answers", "answers": answers}
    except (ValueError, IndexError, OverflowError, TypeError) as exc:
        result = {"outcome": "error", "type": type(exc).__name__, "message": str(exc)[:200]}
    print(json.dumps({"done": path, **result}), flush=True)
"""


def run_cases(
    paths: list[Path], contexts: list[list[int]], mode: str, timeout: float = 20.0
) -> dict[str, dict]:
    """Outcome per case file; a worker that dies, or gives no answer for ``timeout`` seconds on one case,
    is restarted after that case. ``mode``: "on" (load with checksums), "off" (without), "full"
    (checksums + check_integrity)."""
    import queue
    import threading

    results: dict[str, dict] = {}
    pending = list(paths)
    while pending:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(contexts), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump(out=proc.stdout, lines=lines) -> None:
            for line in out:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        proc.stdin.write("\n".join(str(p) for p in pending) + "\n")
        proc.stdin.close()
        started, hung = None, False
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:  # no progress on one case for `timeout` seconds: a hang
                hung = True
                proc.kill()
                break
            if line is None:
                break
            record = json.loads(line)
            if "start" in record:
                started = record["start"]
            else:
                results[record["done"]] = record
                started = None
        proc.wait()
        if started is not None:  # the case the worker was on when it died or stopped answering
            results[started] = {"outcome": "hang" if hung else "crash"}
        done = set(results)
        pending = [p for p in pending if str(p) not in done]
    return results


def fuzz(tmp: Path, cases: int, seed: int, mode: str) -> dict[str, dict[str, int]]:
    """Counts of outcomes per mutation class over ``cases`` mutants of a small random store."""
    from rasd import Datastore

    rng = np.random.default_rng(seed)
    store = Datastore(vocab_size=40)
    docs = [rng.integers(0, 40, int(rng.integers(5, 60))) for _ in range(12)]
    docs += [np.tile(docs[0][:7], 5)]  # repeats: long matches and deep trees
    for d in docs:
        store.add(d)
    base_path = tmp / "base.rasd"
    store.save(base_path)
    base = DatastoreFile.read(base_path)
    contexts = [d[: int(rng.integers(1, len(d)))].tolist() for d in docs[:6]]
    contexts += [rng.integers(0, 40, 12).tolist(), [], docs[-1].tolist()]
    # Mismatches after long matches: the matcher walks suffix links (where a damaged link would loop).
    contexts += [[*d[:20].tolist(), *rng.integers(0, 40, 6).tolist(), *d[5:15].tolist()] for d in docs[:6]]
    truth = run_cases([base_path], contexts, "full")[str(base_path)]
    assert truth["outcome"] == "answers"
    paths, kinds = [], {}
    for i in range(cases):
        kind, data = mutate(base, rng)
        path = tmp / f"case{i:05d}.rasd"
        path.write_bytes(data)
        paths.append(path)
        kinds[str(path)] = kind.split(":")[0] if kind.split(":")[0] != "array" else kind
    counts: dict[str, dict[str, int]] = {}
    for path, result in run_cases(paths, contexts, mode).items():
        outcome = result["outcome"]
        if outcome == "answers":
            outcome = "correct" if result["answers"] == truth["answers"] else "wrong"
        per_kind = counts.setdefault(kinds[path], dict.fromkeys(OUTCOMES, 0))
        per_kind[outcome] += 1
    counts["all"] = {o: sum(c[o] for c in counts.values()) for o in OUTCOMES}
    return counts


OUTCOMES = ("error", "correct", "wrong", "crash", "hang")


@pytest.mark.parametrize("mode", ["on", "off", "full"], ids=["checksums-on", "checksums-off", "full-check"])
def test_structured_fuzzer_finds_no_crash_hang_or_silent_error(tmp_path, mode):
    """0 crashes and 0 hangs in every mode. Checksums on: a flipped byte or a crafted header is never
    answered wrongly. The full check (``rasd datastore verify``) also refuses every structural change to the
    arrays; what it cannot know is a crafted file's *counts*: recomputed CRCs and consistent structure make
    it another valid store, whose answers differ from the original's (counted, not a corruption)."""
    cases = int(os.environ.get("RASD_FUZZ_CASES", "150"))
    counts = fuzz(tmp_path, cases, seed={"on": 1, "off": 2, "full": 3}[mode], mode=mode)
    print(f"\nfuzzer, checksums {mode}: " + json.dumps(counts))
    assert counts["all"]["crash"] == 0 and counts["all"]["hang"] == 0, counts
    if mode in ("on", "full"):
        assert all(counts.get(k, {}).get("wrong", 0) == 0 for k in ("flip", "header", "section")), counts
    if mode == "full":
        structural = [k for k in counts if k not in ("array:count", "all")]
        assert all(counts[k]["wrong"] == 0 for k in structural), counts
    assert counts["all"]["error"] > cases // 4  # the mutants do reach the checks


def test_the_writer_round_trips_and_the_native_crc_is_zlibs(tmp_path):
    from rasd import Datastore, _core

    store = Datastore(vocab_size=30)
    store.add([1, 2, 3, 1, 2, 4])
    store.save(tmp_path / "a.rasd")
    original = (tmp_path / "a.rasd").read_bytes()
    assert DatastoreFile.read(tmp_path / "a.rasd").encode() == original
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 100, 4097):
        blob = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _core.crc32(blob) == zlib.crc32(blob)
