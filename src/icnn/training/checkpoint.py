"""Atomic checkpoints: ``OUT/checkpoint/{model.safetensors, state.pt, config.json}``.

``model.safetensors`` holds the weights (loadable without pickle); ``state.pt`` (``torch.save``,
read back with ``weights_only=True``) holds everything needed to resume exactly: optimizer,
scheduler, grad scaler, filter-loss buffers, RNG states (torch, CUDA, numpy, python), epoch and
step; ``config.json`` the run's config.

A checkpoint directory is never left half-written. Every file is written to a temporary file,
flushed and ``fsync``-ed, then ``os.replace``-d, inside a fresh temporary directory; that
directory then replaces the old one by two renames::

    checkpoint      -> checkpoint.old     (the previous, complete checkpoint)
    .checkpoint.tmp -> checkpoint         (the new, complete checkpoint)
    rm -r checkpoint.old

A crash before the second rename leaves ``checkpoint.old`` complete, and
:func:`resolve_checkpoint` falls back to it; a crash before the first leaves ``checkpoint``
untouched. Stale temporary directories are ignored and removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

CHECKPOINT_DIR = "checkpoint"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (missing, truncated, or not ours); one-line message."""


class NonFiniteLossError(FloatingPointError):
    """The loss, a weight or a buffer became NaN/inf; the message names where and which."""


class RunDirError(ValueError):
    """An output directory that is a file, belongs to another run, or is in use; one-line message."""


# ----------------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically: temp file in the same dir, fsync, ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _torch_bytes(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# RNG states (stored as tensors and plain python so that weights_only loading accepts them)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# save / load


def _tensors(obj: Any, prefix: str):
    """``(name, tensor)`` of every tensor nested in dicts/lists of ``obj``."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def first_nonfinite(tensors) -> str | None:
    """The name of the first floating tensor among ``(name, tensor)`` pairs holding a NaN/inf, or None."""
    bad = (name for name, t in tensors if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()))
    return next(bad, None)


def check_finite(tensors: dict[str, torch.Tensor], state: dict[str, Any] | None = None) -> None:
    """Raises NonFiniteLossError naming the first floating tensor (of the model's, then of the
    state's) holding a NaN/inf."""
    name = first_nonfinite([*tensors.items(), *_tensors(state or {}, "state")])
    if name is not None:
        raise NonFiniteLossError(f"non-finite values in {name}: the checkpoint was not written (the last one on disk "
                                 "is kept); training stopped (lower --lr or --lambda)")


def save_checkpoint(out: str | os.PathLike, model: torch.nn.Module, state: dict[str, Any], config: dict[str, Any]) -> Path:
    """Writes ``OUT/checkpoint/`` atomically (see module docstring); returns its path.

    Every tensor (weights, buffers, optimizer and loss state) is checked finite first: a
    NaN/inf raises NonFiniteLossError and nothing is written."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}  # safetensors refuses shared storage
    check_finite(tensors, {k: v for k, v in state.items() if k != "rng"})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / CHECKPOINT_DIR
    old = out / f"{CHECKPOINT_DIR}.old"
    tmp = out / f".{CHECKPOINT_DIR}.tmp-{os.getpid()}"
    for stale in out.glob(f".{CHECKPOINT_DIR}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        atomic_write_bytes(tmp / WEIGHTS_FILE, save_safetensors_bytes(tensors, metadata={"format": "icnn"}))
        atomic_write_bytes(tmp / STATE_FILE, _torch_bytes({"format_version": FORMAT_VERSION, **state}))
        atomic_write_json(tmp / CONFIG_FILE, config)
        _fsync_dir(tmp)
        if final.exists():
            if old.exists():
                if not _is_complete(final):
                    shutil.rmtree(final)  # a half-made dir can only come from outside; keep the good one
                else:
                    shutil.rmtree(old)
            if final.exists():
                os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in (WEIGHTS_FILE, STATE_FILE, CONFIG_FILE))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for ``path``: a run's OUT dir, or a checkpoint dir itself.

    Falls back to ``checkpoint.old`` when a crash interrupted the swap of directories.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if path.is_file():
        path = path.parent  # e.g. OUT/checkpoint/state.pt
    candidates = [path] if _is_complete(path) else []
    candidates += [path / CHECKPOINT_DIR, path / f"{CHECKPOINT_DIR}.old"]
    for c in candidates:
        if c.is_dir() and _is_complete(c):
            return c
    raise CheckpointError(
        f"checkpoint {path}: no complete checkpoint there (expected {WEIGHTS_FILE}, {STATE_FILE}, {CONFIG_FILE})"
    )


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Reads a checkpoint: ``(weights, state, config)``. Raises CheckpointError on any problem."""
    ckpt = resolve_checkpoint(path)
    try:
        weights = load_safetensors_bytes((ckpt / WEIGHTS_FILE).read_bytes())
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {ckpt / WEIGHTS_FILE}: unreadable weights ({exc})") from None
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {ckpt / STATE_FILE}: unreadable state ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {ckpt / STATE_FILE}: not an icnn training state (format {FORMAT_VERSION})")
    try:
        config = json.loads((ckpt / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt / CONFIG_FILE}: unreadable config ({exc})") from None
    return weights, state, config


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run directory of a checkpoint path (its OUT dir)."""
    ckpt = resolve_checkpoint(path)
    return ckpt.parent if ckpt.name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old") else ckpt


def output_dir(out: str | os.PathLike, flag: str = "--out") -> Path:
    """``out`` as a Path, if it can be an output directory (it may not exist yet); RunDirError
    naming ``flag`` when it is a file. Every command that writes a folder checks it this way."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{flag} {out}: exists and is not a directory")
    return out


class RunLock:
    """Exclusive ownership of a run directory while a run writes into it (``OUT/.lock``, flock).

    ``claim(out, resume)``: a fresh run (``resume=None``) needs a directory that holds no run; a
    resumed run writes into the directory it resumes, nowhere else. Either way the directory must
    not be in use by another process. Released on ``close`` (and by the OS when the process dies).
    """

    def __init__(self, out: str | os.PathLike, resume: str | os.PathLike | None = None, *, flag: str = "--out"):
        out = output_dir(out, flag)
        for parent in out.parents:
            if parent.exists() and not parent.is_dir():
                raise RunDirError(f"{flag} {out}: {parent} is a file, not a directory")
        if resume is None:
            if (out / CHECKPOINT_DIR).exists() or (out / f"{CHECKPOINT_DIR}.old").exists():
                raise RunDirError(f"{flag} {out}: already holds a run ({out / CHECKPOINT_DIR}); resume it or choose another {flag}")
        else:
            owner = run_dir_of(resume)
            if owner.resolve() != out.resolve():
                raise RunDirError(f"{flag} {out}: a resumed run writes into its own directory ({owner}), not into another one")
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / ".lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RunDirError(f"{flag} {out}: in use by another running icnn process") from None
        except ImportError:  # no flock (Windows): no lock
            pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
