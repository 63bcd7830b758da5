"""vLLM worker extension that loads new policy weights (safetensors format: a /dev/shm file, or bytes): the
`object_store` transport's engine side. (The `nccl` / `ipc` transports use vLLM's own worker methods instead.)

vLLM instantiates this mixin inside each engine worker process
(`LLM(worker_extension_cls="actors.weight_receiver.WeightReceiver")`) and the
rollout actor calls it with `llm.collective_rpc("load_weights_from_file", ...)` (the actor staged the
weights in /dev/shm) or, when /dev/shm is not usable, `"load_weights_from_bytes"`.
The payload crosses vLLM's msgspec boundary, where raw tensors do not
survive but `bytes` do, hence safetensors bytes (one serialisation on the
learner, shared through the Ray object store).
"""
from __future__ import annotations

import logging


class _DropRotaryReloadWarning(logging.Filter):
    """vLLM's in-place reload warns "RotaryEmbedding: Failed to load weights" on every push.

    A rotary embedding has no weights, only a cos/sin cache that vLLM restores
    (engine and learner logprobs agree to ~1e-6 after a push, tested), so the
    line is noise; every other warning of that logger still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_DropRotaryReloadWarning())


class WeightReceiver:
    def load_weights_from_bytes(self, payload: bytes) -> int:
        """Reload every tensor named in `payload` (Hugging Face names); returns how many."""
        from safetensors.torch import load

        state = load(payload)
        # `model_runner.model.load_weights` breaks on CPU after the first load;
        # `reload_weights` re-runs the loader in place (../shared/ENVIRONMENT.md).
        self.model_runner.reload_weights(weights_iterator=iter(state.items()))
        return len(state)

    def load_weights_from_file(self, path: str) -> int:
        """Reload every tensor of a safetensors file on this node (in /dev/shm: RAM) from views of its mapping.

        No copy before `reload_weights` copies into the parameters (`safetensors.torch.load_file` would copy every
        tensor out of the mapping first: ~0.45 s of a 0.65 s reload for 100M parameters)."""
        import mmap

        from actors.weight_transport import safetensors_views

        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: the views may not write the file
        weights = safetensors_views(mapped)
        self.model_runner.reload_weights(weights_iterator=iter(weights))
        return len(weights)  # the mapping goes when the last view does
