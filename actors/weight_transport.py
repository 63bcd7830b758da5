"""Weight transport: how the learner's new weights reach every rollout engine, picked by `rollout.weight_transport`.

`TRANSPORTS` is the registry of the names that field accepts (launch/config.py validates against it, with
`check_transport`):

    object_store  CPU and GPU; ours. The learner returns its parameters as `PackedWeights` (safetensors header +
                  uint8 views of the tensors, `pack_weights`): Ray copies them once into the object store, and
                  every actor's `update_weights(ref, version)` reads that one copy without copying it again (numpy
                  arrays come out of the object store zero-copy; `bytes` would be copied per reader), writes it as a
                  safetensors file in /dev/shm (`staged_in_shm`), and the engine workers map the file and reload
                  from views (`safetensors_views`; `actors.weight_receiver.WeightReceiver.load_weights_from_file`).
                  Plain safetensors bytes are accepted too. Has run on CPU (tests, every training run here).
    nccl          GPU only: vLLM's own `nccl` weight-transfer backend (`NCCLTrainerWeightTransferEngine` on learner
                  rank 0, `NCCLWeightTransferEngine` in every engine worker; packed broadcasts from GPU memory,
                  layerwise reload). Across nodes.
    ipc           GPU only: vLLM's `ipc` backend (CUDA IPC handles of the learner's GPU tensors; no copy through
                  the host). Every engine must share a GPU with a learner rank (fractional `num_gpus`).

How a push runs for each is `actors.weight_sync.WeightSync`. The vLLM backends have NOT run on a GPU in this
project; their call sequence is tested on CPU against vLLM's own trainer-side engines with the CUDA parts stubbed
(tests/actors/test_weight_sync.py).

This module owns the registry, the vLLM config/init-info objects of the vLLM backends, the safetensors packing and
zero-copy views and the /dev/shm staging (pure, unit-tested on CPU: tests/actors/test_weight_transport.py). It
imports vLLM only inside the functions that need it (launch/config.py imports this module).
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass



@dataclass(frozen=True)
class Transport:
    name: str
    vllm_backend: str | None
    """Key of vLLM's `WeightTransferEngineFactory` / `WeightTransferTrainerFactory`; None: our object-store path."""
    needs_gpu: bool
    """Engines and learner must hold GPUs (rollout.num_gpus_per_actor > 0 and learner.num_gpus > 0)."""
    shares_gpu: bool = False
    """Engine and learner tensors live on the same GPU (CUDA IPC): the two may not both take a whole GPU."""


TRANSPORTS: dict[str, Transport] = {t.name: t for t in (
    Transport("object_store", None, needs_gpu=False),
    Transport("nccl", "nccl", needs_gpu=True),
    Transport("ipc", "ipc", needs_gpu=True, shares_gpu=True),
)}


def check_transport(name: str, *, rollout_gpus: float = 0.0, learner_gpus: float = 0.0) -> Transport:
    """The transport called `name`; ValueError (one line) if there is none, or if the run's GPUs cannot carry it."""
    if name not in TRANSPORTS:
        raise ValueError(f"rollout.weight_transport={name!r} is not valid; choose one of {', '.join(TRANSPORTS)}")
    t = TRANSPORTS[name]
    if t.needs_gpu and (rollout_gpus <= 0 or learner_gpus <= 0):
        raise ValueError(f"rollout.weight_transport={name} needs GPUs on both sides (vLLM's {t.vllm_backend} weight "
                         f"transfer moves CUDA tensors), but rollout.num_gpus_per_actor={rollout_gpus:g} and "
                         f"learner.num_gpus={learner_gpus:g}; use object_store on CPU")
    if t.shares_gpu and rollout_gpus + learner_gpus > 1:
        raise ValueError(f"rollout.weight_transport={name} shares one GPU between an engine and a learner rank (CUDA "
                         f"IPC), but rollout.num_gpus_per_actor={rollout_gpus:g} + learner.num_gpus={learner_gpus:g} "
                         "> 1; give each a fraction, or use nccl")
    return t


def engine_transfer_kwargs(name: str) -> dict:
    """Extra `vllm.LLM` / `AsyncEngineArgs` arguments of a transport: vLLM builds its weight-transfer engine in every
    worker when `weight_transfer_config` is set (at model load), and refuses the transfer calls otherwise."""
    t = TRANSPORTS[name]
    return {"weight_transfer_config": {"backend": t.vllm_backend}} if t.vllm_backend else {}


def trainer_init_info(name: str, *, rank: int, world_size: int, master_address: str | None, master_port: int | None,
                      buffer_bytes: int):
    """vLLM's trainer-side init info of a vLLM backend, for `WeightTransferTrainerFactory.trainer_init`.

    nccl: learner rank 0 is NCCL rank 0 of a group of `world_size` (1 + every engine worker), rendezvous at
    master_address:master_port; packed broadcasts through buffers of `buffer_bytes` (rollout.weight_bucket_mb).
    ipc: no rendezvous; unpacked (vLLM's default), one IPC handle per tensor."""
    backend = TRANSPORTS[name].vllm_backend
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(master_address=master_address, master_port=master_port, world_size=world_size,
                                   packed=True, packed_buffer_size_bytes=buffer_bytes, rank=rank)
    if backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(packed=False, packed_buffer_size_bytes=buffer_bytes, rank=rank)
    raise ValueError(f"rollout.weight_transport={name!r} is not a vLLM weight-transfer backend")


# ----- safetensors format: packing without a serialiser in between, reading without copies ---------------------------
# https://github.com/huggingface/safetensors#format: u64 little-endian header size N, N bytes of JSON
# {name: {dtype, shape, data_offsets: [begin, end]}} (offsets relative to the data after the header), then the data
# with no holes. `safetensors.torch.save` builds the bytes in Rust and copies them again into a Python `bytes`, and a
# fresh 400 MB buffer costs page faults on top of the copy (0.4-2 s here for 100M parameters). `PackedWeights` is the
# same format in pieces: the header and a uint8 view of every tensor, so `ray.put` (or a Ray return) copies the
# tensors once, straight into the object store, and the reader writes header + pieces as one safetensors file.
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


@dataclass
class PackedWeights:
    """A state dict in safetensors format, in pieces: `header + b"".join(parts)` is the file."""
    header: bytes
    """u64 size + JSON header, padded so the data starts at a multiple of 8."""
    parts: list
    """uint8 numpy arrays, one per tensor in header order (views of the tensors where no conversion was needed)."""

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(p.nbytes for p in self.parts)

    def write(self, f) -> None:
        """Write the safetensors file to an open binary file."""
        f.write(self.header)
        for p in self.parts:
            f.write(memoryview(p).cast("B"))

    def tobytes(self) -> bytes:
        return b"".join([self.header, *(memoryview(p).cast("B") for p in self.parts)])


def pack_weights(state, dtype=None) -> PackedWeights:
    """The state dict as `PackedWeights`, without copying tensors that are contiguous and already in `dtype`.

    `dtype` (a torch dtype) converts floating tensors. Tensors are laid out largest element first, so every tensor
    starts at a multiple of its element size and `safetensors_views` can view it in place. The parts share memory
    with the tensors: serialise them (ray.put, write) before the tensors change."""
    items = []
    for name, t in (state.items() if hasattr(state, "items") else state):
        t = t.detach()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        items.append((name, t.contiguous()))
    items.sort(key=lambda x: -x[1].element_size())  # stable: state order within one element size
    header, offset = {}, 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[str(t.dtype).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % 8)  # the data section starts 8-byte aligned
    import torch

    parts = [t.reshape(-1).view(torch.uint8).numpy() for _, t in items]
    return PackedWeights(struct.pack("<Q", len(head)) + head, parts)


def safetensors_views(buf) -> list[tuple[str, object]]:
    """(name, tensor) for every tensor of a safetensors buffer (bytes-like or an mmap), viewing it in place: no copy.

    The tensors share the buffer's memory: they are valid only while it is, and read-only in intent (an mmap opened
    with ACCESS_COPY keeps the file itself unchanged)."""
    import torch

    mv = memoryview(buf).cast("B")
    (n,) = struct.unpack("<Q", mv[:8])
    header = json.loads(bytes(mv[8: 8 + n]))
    header.pop("__metadata__", None)
    dtypes = {v: getattr(torch, k) for k, v in _ST_DTYPES.items()}
    out = []
    for name, meta in header.items():
        a, b = meta["data_offsets"]
        dt = dtypes[meta["dtype"]]
        if b == a:
            out.append((name, torch.empty(meta["shape"], dtype=dt)))
            continue
        if (8 + n + a) % dt.itemsize:  # not laid out by pack_weights: copy this tensor
            t = torch.frombuffer(bytearray(mv[8 + n + a: 8 + n + b]), dtype=dt)
        else:
            t = torch.frombuffer(mv, dtype=dt, count=(b - a) // dt.itemsize, offset=8 + n + a)
        out.append((name, t.view(meta["shape"])))
    return out


@contextlib.contextmanager
def staged_in_shm(payload, tag: str):
    """A /dev/shm file holding `payload` (`PackedWeights` or safetensors bytes) while the block runs, for engine workers on this node; None
    when /dev/shm is missing or full (the caller falls back to sending the bytes by RPC). One copy: the workers map
    the file instead of receiving pickled bytes (5x slower for 100M parameters through vLLM's RPC)."""
    path = f"/dev/shm/graftrl-weights-{os.getpid()}-{tag}.safetensors"
    try:
        if not os.path.isdir("/dev/shm"):
            yield None
            return
        try:
            with open(path, "wb") as f:
                if isinstance(payload, PackedWeights):
                    payload.write(f)
                else:
                    f.write(memoryview(payload).cast("B"))
        except OSError:
            yield None
            return
        yield path
    finally:
        if os.path.exists(path):
            os.unlink(path)


def payload_bytes(payload) -> bytes:
    """The safetensors bytes of a weight payload (`PackedWeights` or bytes-like), for the RPC fallback."""
    return payload.tobytes() if isinstance(payload, PackedWeights) else bytes(payload)


