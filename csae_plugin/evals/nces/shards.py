"""NCES over many latents in chunks: resumable, and shared across torch.distributed ranks.

The evaluated latents are cut into fixed chunks of ``chunk_latents`` (the same cut whatever the
number of processes); chunk ``c`` is computed by rank ``c % world_size`` and written, finished,
to ``<work_dir>/chunk_<c>.npz`` (atomically). When every chunk exists, rank 0 reads them back in
order and returns the whole :class:`LatentEffects`; the other ranks return ``None``. A chunk
holds the same numbers whichever process computed it, so 1 and N processes give identical
per-latent results, and a rerun after an interruption (Ctrl-C, a killed rank) computes only the
missing chunks. ``work_dir`` holds a fingerprint of the inputs (every SAE parameter and buffer
included); chunks left by different inputs are discarded, never mixed in. The chunks stay until
the caller has written its result (:func:`remove_chunks`), and :func:`exclusive` keeps a second
run off the same ``work_dir`` meanwhile.

Launch with the standard tool (``torchrun --nproc-per-node N -m csae_plugin.evals.nces.main``
or ``torchrun ... -m csae_plugin.cli run``): :func:`init_from_env` joins the process group
(gloo on CPUs, nccl on GPUs, one GPU per rank).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from csae_plugin.causal.engine import LatentEffects
from csae_plugin.evals import EvalInputError, atomic_path

FINGERPRINT_FILE = "fingerprint.json"
_ARRAYS = ("latents", "effect", "null_effects", "sequences", "n_positions")


def init_from_env(device: str) -> str:
    """Join torchrun's process group when launched by it (``WORLD_SIZE`` > 1); return the
    device for this process (``cuda:<LOCAL_RANK>`` on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    # ranks wait for each other between SAEs: allow for a whole dictionary's imbalance
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(days=7))
    return device


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself outside torch.distributed)."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fingerprint(*parts: object) -> str:
    """A short hash of the inputs a chunk's numbers depend on: tensors by dtype, shape and
    bytes, a dict of tensors (a ``state_dict()``: every parameter and buffer) by name and
    tensor, anything else as JSON."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Mapping) and all(isinstance(v, torch.Tensor) for v in part.values()):
            for name in sorted(part):
                digest.update(name.encode())
                _hash_tensor(digest, part[name])
        elif isinstance(part, torch.Tensor):
            _hash_tensor(digest, part)
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{flat.dtype} {tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())


def chunked_effects(
    compute: Callable[[np.ndarray], LatentEffects],
    latents: np.ndarray,
    work_dir: str | Path | None,
    key: str,
    chunk_latents: int,
    progress: bool = True,
) -> LatentEffects | None:
    """``compute(latents)`` one chunk of latents at a time, split over the ranks (see module).

    ``key`` fingerprints the inputs (:func:`fingerprint`). Without ``work_dir`` nothing is
    written and there must be one process. Returns the merged effects on rank 0, ``None`` on
    the others; ``work_dir`` is kept for the caller to remove once its result is written.
    """
    rank, world = rank_and_world()
    chunks = [latents[i : i + chunk_latents] for i in range(0, len(latents), chunk_latents)]
    if not chunks:
        return compute(latents)
    if work_dir is None:
        if world > 1:
            raise ValueError("a run over several processes needs a work folder for its chunks")
        return _merge([compute(ids) for ids in chunks])
    work = Path(work_dir)
    _claim(work, key, rank)
    mine = [c for c in range(len(chunks)) if c % world == rank]
    todo = [c for c in mine if not _chunk_path(work, c).exists()]
    if len(todo) < len(mine):
        print(f"[nces] resuming: {len(mine) - len(todo)} of {len(mine)} chunks already done")
    bar = tqdm(
        total=sum(len(chunks[c]) for c in mine),
        initial=sum(len(chunks[c]) for c in mine if c not in todo),
        desc=f"NCES chunks of {chunk_latents} latents" + (f" (rank {rank})" if world > 1 else ""),
        unit="latent",
        disable=not progress or len(chunks) == 1,
    )
    for c in todo:
        _save(compute(chunks[c]), _chunk_path(work, c))
        bar.update(len(chunks[c]))
    bar.close()
    barrier()  # every chunk is written
    if rank != 0:
        return None
    return _merge([_load(_chunk_path(work, c)) for c in range(len(chunks))])


def remove_chunks(work_dir: str | Path) -> None:
    """Delete ``work_dir``'s chunks (rank 0); call only once the result they make is written."""
    if is_main_process():
        shutil.rmtree(work_dir, ignore_errors=True)


@contextlib.contextmanager
def exclusive(work_dir: str | Path) -> Iterator[None]:
    """Hold ``work_dir``'s lock file (``.lock`` beside it) for the block, so that a second run
    computing the same result refuses with one line instead of sharing, and then deleting,
    this run's chunks. Rank 0 takes the lock and tells the other ranks; the operating system
    drops it if the process dies, and the file is removed when the block ends."""
    lock = Path(work_dir).with_suffix(".lock")
    fd, refusal = _try_lock(lock) if is_main_process() else (None, "")
    if rank_and_world()[1] > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        raise EvalInputError(refusal)
    try:
        yield
    finally:
        if fd is not None:
            lock.unlink(missing_ok=True)  # while still holding it
            os.close(fd)


def _try_lock(lock: Path) -> tuple[int | None, str]:
    """(descriptor holding ``lock``, "") or (None, why not); no lock where flock is missing."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None, ""
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            result = lock.name.removeprefix(".").removesuffix(".lock") + ".json"
            return None, (
                f"another run is computing {result} in {str(lock.parent)!r} (it holds "
                f"{lock.name}); wait for it to finish, or pass another --output-dir"
            )
        if lock.exists() and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            return fd, ""
        os.close(fd)  # its holder finished and removed it meanwhile: take a fresh one


def _claim(work: Path, key: str, rank: int) -> None:
    """Rank 0 makes ``work`` hold ``key``'s chunks only (discarding others); all ranks wait."""
    if rank == 0:
        marker = work / FINGERPRINT_FILE
        if work.exists() and (not marker.exists() or marker.read_text().strip() != key):
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            with atomic_path(marker) as tmp:
                tmp.write_text(key + "\n")
    barrier()


def _chunk_path(work: Path, chunk: int) -> Path:
    return work / f"chunk_{chunk:06d}.npz"


def _save(effects: LatentEffects, path: Path) -> None:
    meta = {
        "intervention": effects.intervention,
        "null_draws": effects.null_draws,
        "alpha": effects.alpha,
        "nulls": list(effects.nulls),
    }
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # a handle: np.savez would append ".npz" to a name
            np.savez(
                handle,
                meta=np.array(json.dumps(meta)),
                **{name: getattr(effects, name) for name in _ARRAYS},
            )


def _load(path: Path) -> LatentEffects:
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        arrays = {name: data[name] for name in _ARRAYS}
    meta["nulls"] = tuple(meta["nulls"])
    return LatentEffects(**arrays, **meta)


def _merge(parts: list[LatentEffects]) -> LatentEffects:
    """The effects of all parts' latents, in order (the parts share every setting)."""
    first = parts[0]
    values = {
        f.name: (
            np.concatenate([getattr(p, f.name) for p in parts])
            if f.name in _ARRAYS
            else getattr(first, f.name)
        )
        for f in fields(LatentEffects)
    }
    return LatentEffects(**values)
