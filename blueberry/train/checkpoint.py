"""Checkpoints: everything a run needs to continue bit-exactly, written atomically, the last K kept.

<run_dir>/checkpoints/step-000123.pt holds the model, the optimizers (Muon and AdamW state), the LR
schedulers, the GradScaler, the metric window being accumulated, every RNG state and the step. The data
position is the step itself: the train sampler draws batch(step) from a seed, with no iterator state.
Only tensors and plain Python values go in, so `torch.load(weights_only=True)` reads a checkpoint
without running any pickled code.

The sha256 of each checkpoint's bytes is recorded beside the directory, in <run_dir>/checkpoints.sha256
(`sha256sum` format: `cd checkpoints && sha256sum -c ../checkpoints.sha256` checks them), before the
checkpoint is renamed into place. A resume takes the newest checkpoint that verifies and loads; a corrupt
one (bad checksum, truncated, unreadable) is renamed step-000123.pt.corrupt — kept for inspection, never
deleted — and the next older one is tried.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from blueberry.fileio import atomic_writer

STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


class ResumeError(ValueError):
    """A checkpoint cannot be used for this run (another spec, unreadable, or none to resume)."""


class CorruptCheckpoint(ResumeError):
    """A checkpoint file is damaged: its checksum differs, or it does not load."""


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_checksums(manifest: Path) -> dict[str, str]:
    """{file name: sha256} from a `sha256sum`-format file. None there, or an unreadable one, gives {}: the
    checkpoints are then judged by torch.load alone (as those written before checksums are)."""
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    pairs = (line.partition("  ") for line in lines)
    return {name: digest for digest, _, name in pairs if name and re.fullmatch(r"[0-9a-f]{64}", digest)}


def rng_state() -> dict:
    """torch (CPU and every CUDA device), Python `random` and NumPy generator states, as tensors and plain types."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "keys": list(keys), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": np_state["state"]["pos"],
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        },
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():  # saved per visible GPU: a resume may see fewer (IndexError)
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    py = state["python"]
    random.setstate((py["version"], tuple(py["keys"]), py["gauss"]))
    np_state = state["numpy"]
    key = np_state["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): equal digests, identical weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_paths(directory: Path) -> list[Path]:
    """The step-*.pt files in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


class Checkpointer:
    """Saves and finds the checkpoints of one run.

    `every`: steps between checkpoints (None: only when the run is stopped by a signal).
    `on_save(path, step)`: called after each save (W&B artifact upload).
    """

    def __init__(
        self,
        directory: Path,
        spec_hash: str,
        every: int | None,
        keep: int,
        on_save: Callable[[Path, int], None] | None = None,
        also_accept: tuple[str, ...] = (),
    ):
        self.dir, self.spec_hash, self.every, self.keep, self.on_save = Path(directory), spec_hash, every, keep, on_save
        self.also_accept = also_accept  # other hashes of this spec (RunSpec.legacy_spec_hash) a checkpoint may hold
        self.manifest = self.dir.with_name(self.dir.name + ".sha256")

    def _record_checksums(self, checksums: dict[str, str]) -> None:
        # fsync'd as the checkpoints are: after a host crash, an empty list would vouch for nothing
        with atomic_writer(self.manifest, fsync=True) as handle:
            handle.write("".join(f"{digest}  {name}\n" for name, digest in sorted(checksums.items())))

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def latest(self) -> Path | None:
        paths = checkpoint_paths(self.dir)
        return paths[-1] if paths else None

    def save(self, state: dict, step: int) -> Path:
        """Write step-<step>.pt via a temp file + fsync + rename (a crash leaves the old set intact); prune to K."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{step:06d}.pt"
        buffer = io.BytesIO()
        torch.save({**state, "step": step, "spec_hash": self.spec_hash}, buffer)
        data = buffer.getbuffer()
        checksums = read_checksums(self.manifest)  # the checksum is on disk before the file it vouches for
        checksums[path.name] = hashlib.sha256(data).hexdigest()
        self._record_checksums(checksums)
        with atomic_writer(path, binary=True, fsync=True) as handle:
            handle.write(data)
        for old in checkpoint_paths(self.dir)[: -self.keep]:
            old.unlink(missing_ok=True)
        kept = {p.name for p in checkpoint_paths(self.dir)}
        self._record_checksums({name: d for name, d in read_checksums(self.manifest).items() if name in kept})
        if self.on_save is not None:
            self.on_save(path, step)
        return path

    def clean_partial(self) -> None:
        """Remove temp files of a save that a kill interrupted, the checkpoint's or the checksum list's (the caller
        owns the run directory)."""
        partial = [*self.dir.glob(".step-*.tmp")] if self.dir.is_dir() else []
        for tmp in [*partial, *self.manifest.parent.glob(f".{self.manifest.name}.*.tmp")]:
            tmp.unlink(missing_ok=True)

    def load(self, path: Path) -> dict:
        """Read a checkpoint safely (`weights_only`) after checking its checksum; refuse one written for another
        spec (ResumeError) and a damaged one (CorruptCheckpoint)."""
        expected = read_checksums(self.manifest).get(path.name)
        try:  # every byte read once: a file this process cannot read (its access, a disk error) is not damaged
            digest = file_digest(path)
        except OSError as exc:
            raise ResumeError(f"cannot read checkpoint {path} ({exc.strerror}): fix that, or move it away") from None
        if expected is not None and digest != expected:
            raise CorruptCheckpoint(f"checkpoint {path}: sha256 differs from the one recorded when it was written")
        try:
            # None recorded (written before checksums, or the list lost): the zip's own CRCs, which torch.load
            # does not check, so flipped bytes would load (0.06 s for 200 MB; a legacy non-zip file: torch.load's)
            if expected is None and zipfile.is_zipfile(path) and (bad := zipfile.ZipFile(path).testzip()) is not None:
                raise CorruptCheckpoint(f"checkpoint {path}: its entry {bad} fails its CRC check")
            state = torch.load(path, map_location="cpu", weights_only=True)
        except CorruptCheckpoint:
            raise
        except Exception as exc:  # truncated (torch's zip reader then raises OSError too), corrupt, not a checkpoint
            raise CorruptCheckpoint(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
        found = state.get("spec_hash") if isinstance(state, dict) else None
        if found != self.spec_hash and found not in self.also_accept:
            raise ResumeError(
                f"checkpoint {path} belongs to another spec (spec hash {str(found)[:12]}, this spec "
                f"{self.spec_hash[:12]}): resume with the spec it was written for, or start a new run"
            )
        if state.get("step") != int(STEP_FILE.match(path.name).group(1)):
            raise CorruptCheckpoint(f"checkpoint {path} holds step {state.get('step')!r}, not the one it is named for")
        return state

    def load_newest(self) -> tuple[dict | None, list[tuple[Path, str]]]:
        """The newest checkpoint that verifies and loads (None if none does), and each newer one skipped as
        corrupt with why; those are renamed *.corrupt, out of the resume's and keep-last-K's way."""
        skipped = []
        for path in reversed(checkpoint_paths(self.dir)):
            try:
                return self.load(path), skipped
            except CorruptCheckpoint as exc:
                aside = path.with_name(path.name + ".corrupt")
                for n in itertools.count(2):  # an earlier damaged file of this step is kept too
                    if not aside.exists():
                        break
                    aside = path.with_name(f"{path.name}.corrupt.{n}")
                try:
                    os.replace(path, aside)
                except OSError as moving:
                    raise ResumeError(f"{exc}; it cannot be set aside ({moving.strerror}): move it away") from None
                skipped.append((aside, str(exc)))
        return None, skipped


class FollowerCheckpointer:
    """What a torchrun rank other than 0 checkpoints with: it writes nothing (`Trainer.checkpoint` saves only on
    rank 0), but knows the steps rank 0 saves at, for at those steps every rank hands rank 0 its own RNG states and
    metric window."""

    def __init__(self, every: int | None):
        self.every = every

    due = Checkpointer.due  # the same steps as rank 0's Checkpointer

    def latest(self) -> None:
        return None
