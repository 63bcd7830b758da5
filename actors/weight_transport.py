"""Weight transport: how the learner's new weights reach every rollout engine, picked by `rollout.weight_transport`.

    object_store  CPU and GPU. The learner returns its parameters as `PackedWeights` (safetensors header +
                  uint8 views of the tensors, `pack_weights`): Ray copies them once into the object store, and
                  every actor's `update_weights(ref, version)` reads that one copy without copying it again (numpy
                  arrays come out of the object store zero-copy; `bytes` would be copied per reader), writes it as a
                  safetensors file in /dev/shm (`staged_in_shm`), and the engine workers map the file and reload
                  from views (`safetensors_views`; `actors.weight_receiver.WeightReceiver.load_weights_from_file`).
                  Plain safetensors bytes are accepted too.
    nccl          GPU clusters. Learner rank 0 and every engine worker join one NCCL group (vLLM's
                  `StatelessProcessGroup` + `PyNcclCommunicator`, from vllm.distributed.weight_transfer). Tensors
                  are packed into byte buckets of ~`weight_bucket_mb`; the bucket plan (names, shapes, dtypes,
                  offsets) goes to the actors through Ray, the bytes go by one NCCL broadcast per bucket, and
                  every worker unpacks views and calls the same `reload_weights` as the CPU path.

This module owns the transport choice, the safetensors packing and zero-copy views, the /dev/shm staging, the
bucket plan and the packing (pure torch, unit-tested on CPU: tests/actors/test_weight_transport.py) and the
sender side of the NCCL path. It does not own the learner's
process group or its parameter gathering (ZeRO-3 must gather before `NcclSender.send`). The NCCL path has not
run here (no GPU on these machines): see docs/ROLLOUT.md for what must be checked on a GPU.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass

TRANSPORTS = ("object_store", "nccl")


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lies inside its bucket."""
    name: str
    """Hugging Face parameter name."""
    shape: tuple[int, ...]
    dtype: str
    """torch dtype name without the `torch.` prefix (float32, bfloat16, ...)."""
    offset: int
    """Byte offset inside the bucket (a multiple of ALIGN)."""
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    tensors: tuple[TensorMeta, ...]
    nbytes: int
    """Size of the packed uint8 buffer (ALIGN-padded)."""


ALIGN = 256
"""Byte alignment of every tensor inside a bucket (safe for any dtype's views, and for GPU kernels)."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_buckets(metas: list[tuple[str, tuple[int, ...], str, int]], bucket_bytes: int) -> list[Bucket]:
    """Group tensors, in the given order, into buckets of at most `bucket_bytes` (aligned).

    metas: (name, shape, dtype name, nbytes) per tensor. A tensor larger than `bucket_bytes` gets a bucket of its
    own. Order is kept, so sender and receivers derive the same plan from the same list.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be > 0")
    buckets, cur, size = [], [], 0
    for name, shape, dtype, nbytes in metas:
        if cur and size + _align(nbytes) > bucket_bytes:
            buckets.append(Bucket(tuple(cur), size))
            cur, size = [], 0
        cur.append(TensorMeta(name, tuple(int(s) for s in shape), dtype, size, int(nbytes)))
        size += _align(nbytes)
    if cur:
        buckets.append(Bucket(tuple(cur), size))
    return buckets


def state_metas(state) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(name, shape, dtype name, nbytes) of every tensor of a state dict (or an iterable of (name, tensor))."""
    items = state.items() if hasattr(state, "items") else state
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch."), v.numel() * v.element_size()) for k, v in items]


def pack_bucket(bucket: Bucket, state, device=None):
    """One flat uint8 tensor holding the bucket's tensors at their offsets. (nbytes,)"""
    import torch

    flat = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
    for m in bucket.tensors:
        t = state[m.name]
        if list(t.shape) != list(m.shape) or str(t.dtype).removeprefix("torch.") != m.dtype:
            raise ValueError(f"tensor {m.name}: {tuple(t.shape)} {t.dtype} does not match the plan {m.shape} {m.dtype}")
        flat[m.offset: m.offset + m.nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return flat


def unpack_bucket(bucket: Bucket, flat) -> list[tuple[str, object]]:
    """(name, tensor) views into `flat`, in plan order; no copies."""
    import torch

    out = []
    for m in bucket.tensors:
        out.append((m.name, flat[m.offset: m.offset + m.nbytes].view(getattr(torch, m.dtype)).view(m.shape)))
    return out


def plan_to_wire(plan: list[Bucket]) -> list:
    """Plain lists (msgspec-safe: the plan crosses vLLM's collective_rpc boundary)."""
    return [[b.nbytes, [[m.name, list(m.shape), m.dtype, m.offset, m.nbytes] for m in b.tensors]] for b in plan]


def plan_from_wire(wire: list) -> list[Bucket]:
    return [Bucket(tuple(TensorMeta(n, tuple(s), d, o, nb) for n, s, d, o, nb in ts), nbytes) for nbytes, ts in wire]


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


def check_transport(name: str) -> str:
    if name not in TRANSPORTS:
        raise ValueError(f"rollout.weight_transport={name!r} is not valid; choose one of {', '.join(TRANSPORTS)}")
    return name


def nccl_world(engines_per_actor: list[int]) -> tuple[int, list[int]]:
    """NCCL world size (learner rank 0 + every engine worker) and each actor's rank offset (its first worker's rank).

    engines_per_actor[i]: tensor-parallel x pipeline-parallel size of actor i's engine."""
    offsets, rank = [], 1
    for n in engines_per_actor:
        if n < 1:
            raise ValueError(f"an engine has {n} workers; each has at least 1")
        offsets.append(rank)
        rank += n
    return rank, offsets


class NcclSender:
    """Learner rank 0's side of the `nccl` transport (GPU only).

        sender = NcclSender(master_address, master_port, world_size)   # concurrently with every actor's nccl_init
        plan = plan_buckets(state_metas(state), bucket_bytes)            # send `plan` to the actors through Ray
        sender.send(plan, state)                                         # concurrently with every actor's nccl_receive
    """

    def __init__(self, master_address: str, master_port: int, world_size: int):
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self.comm = trainer_init({"master_address": master_address, "master_port": master_port,
                                  "world_size": world_size}, rank=0)

    def send(self, plan: list[Bucket], state) -> None:
        import torch

        for bucket in plan:
            flat = pack_bucket(bucket, state, device=torch.device("cuda", torch.cuda.current_device()))
            self.comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        torch.cuda.synchronize()


class ObjectStoreTransport:
    """`object_store`: one serialised copy in Ray's object store, loaded by every actor."""

    name = "object_store"

    @staticmethod
    def push(actors, payload_ref, version: int) -> list:
        """Refs of every actor's `update_weights(payload_ref, version)` call."""
        return [a.update_weights.remote(payload_ref, version) for a in actors]


class NcclTransport:
    """`nccl`: the driver starts every actor's receive, and the learner's `NcclSender.send`, for the same plan.

    The learner side is an object that has `nccl_send.remote(plan)` (rank 0 of the learner group calls
    `NcclSender.send` on its gathered state dict)."""

    name = "nccl"

    @staticmethod
    def push(actors, learner, plan: list[Bucket], version: int) -> list:
        refs = [a.nccl_receive.remote(plan, version) for a in actors]
        return refs + [learner.nccl_send.remote(plan)]
