"""Saves survive a killed process: the file at the path is the old version or the new one, never a torn one.

``lora.file.save_lora``, ``lora.file.save_lora_file`` and ``training.train_state.save_train_state`` write to a
temporary file in the same folder and ``os.replace`` it over the path. Here a writer process
(tests/atomic_save_writer.py) saves two distinguishable versions in turn, forever, and is SIGKILLed
at seeded random moments; after each kill the file must be absent (the first save had not finished)
or load completely and equal one of the two versions exactly. A killed save may leave its temporary
file behind: it must carry a temporary name that neither the loaders nor a folder listing of LoRA
files (``*.safetensors``) would take for the real file.
"""
from __future__ import annotations

import os
import queue
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import atomic_save_writer as writer_mod  # noqa: E402

KILLS = 20  # per kind
MAX_DELAY_S = 0.3  # kill at a uniform moment in [0, MAX_DELAY_S] after the writer says it is saving
FIRST_SAVE_S = 0.015  # ... or in [0, FIRST_SAVE_S] for a fresh path: one save of ~4 MB takes about 10 ms
SUFFIX = {"lora": ".safetensors", "lora_file": ".safetensors", "train_state": ".pt"}


def same(a, b) -> bool:
    """Exact equality of loaded objects: tensors by dtype, shape and value; containers recursively."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def is_temp_name(kind: str, name: str, finals: set[str]) -> bool:
    """Whether ``name`` is the temporary file of a save to one of ``finals``.

    The library's own (mkstemp: a dot, the final name, a random part, ``.tmp``), or
    for safetensors files also the one safetensors itself writes first and renames (``.tmp`` and six
    random characters, from Rust's tempfile crate).
    """
    if any(re.fullmatch(rf"\.{re.escape(f)}\.[A-Za-z0-9_]+\.tmp", name) for f in finals):
        return True
    return kind != "train_state" and re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", name) is not None


class Writer:
    """The writer process: forks one saving loop per ``start``; lines from it arrive on a queue."""

    def __init__(self, stderr_path: Path):
        self.stderr_path = stderr_path
        self.stderr = open(stderr_path, "w")
        self.proc = subprocess.Popen([sys.executable, writer_mod.__file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect("ready", timeout=180)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("<eof>")

    def expect(self, word: str, timeout: float = 60) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = "<timeout>"
        if not line.startswith(word):
            pytest.fail(f"writer said {line!r}, expected {word!r}; its stderr:\n"
                        f"{self.stderr_path.read_text()[-3000:]}")
        return line.split(" ", 1)[-1]

    def start(self, kind: str, path: Path) -> int:
        self.proc.stdin.write(f"{kind} {path}\n")
        self.proc.stdin.flush()
        return int(self.expect("saving"))

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def writer(tmp_path_factory):
    w = Writer(tmp_path_factory.mktemp("writer") / "stderr.txt")
    yield w
    w.close()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the writer process forks one saving loop per kill")
@pytest.mark.parametrize("kind", writer_mod.KINDS)
def test_killed_save_leaves_the_old_or_the_new_file(kind, writer, tmp_path, record_property):
    references = {}
    for version in writer_mod.VERSIONS:
        ref = tmp_path / "ref" / f"v{version}{SUFFIX[kind]}"
        writer_mod.save(kind, str(ref), writer_mod.build(kind, version), version)
        references[version] = writer_mod.load(kind, str(ref))
    assert not same(references[1], references[2])
    folder = tmp_path / "out"
    folder.mkdir()
    rng = random.Random(f"atomic-saves-{kind}")
    outcomes: Counter[str] = Counter()
    for i in range(KILLS):
        # every fourth kill aims at the first save to a fresh path, where "absent" is the old state
        name = f"fresh{i}{SUFFIX[kind]}" if i % 4 == 3 else f"main{SUFFIX[kind]}"
        path = folder / name
        pid = writer.start(kind, path)
        time.sleep(rng.uniform(0, FIRST_SAVE_S if name.startswith("fresh") else MAX_DELAY_S))
        os.kill(pid, signal.SIGKILL)
        status = int(writer.expect("reaped"))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"the writer ended by itself (status {status}); its stderr:\n{writer.stderr_path.read_text()[-3000:]}")
        if path.exists():
            try:
                loaded = writer_mod.load(kind, str(path))
            except Exception as err:  # noqa: BLE001 - any failure to read means a torn file
                pytest.fail(f"kill {i}: {name} is torn: {type(err).__name__}: {err}")
            matches = [v for v in writer_mod.VERSIONS if same(loaded, references[v])]
            assert matches, f"kill {i}: {name} loads but equals neither version"
            outcomes[f"v{matches[0]}"] += 1
        else:
            assert name.startswith("fresh"), f"kill {i}: {name} vanished after an earlier save had finished"
            outcomes["absent"] += 1
        names = {f"main{SUFFIX[kind]}", *(f"fresh{j}{SUFFIX[kind]}" for j in range(i + 1))}
        leftovers = sorted(p.name for p in folder.iterdir() if p.name not in names)
        for left in leftovers:
            assert is_temp_name(kind, left, names), left
            assert not left.endswith((".safetensors", ".pt")), left  # never listed as a LoRA or a state
        per_kill = 1 if kind == "train_state" else 2  # safetensors writes a temporary file of its own
        assert len(leftovers) <= per_kill * (i + 1), (
            f"{len(leftovers)} temporary files after {i + 1} kills: finished saves leak them")
    assert outcomes["v1"] + outcomes["v2"] > 0
    # A killed save's temporary file is not removed by later saves; it stays until someone deletes it.
    record_property("outcomes", dict(outcomes))
    record_property("leftover_temp_files", len(leftovers))
    print(f"{kind}: {dict(outcomes)}, {len(leftovers)} temporary files left by {KILLS} kills")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("kind", writer_mod.KINDS)
def test_saved_files_get_the_usual_permissions(kind, tmp_path):
    path = tmp_path / f"saved{SUFFIX[kind]}"
    writer_mod.save(kind, str(path), writer_mod.build(kind, 1), 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
