"""vLLM worker extension that loads new policy weights sent as safetensors bytes.

vLLM instantiates this mixin inside each engine worker process
(`LLM(worker_extension_cls="actors.weight_receiver.WeightReceiver")`) and the
rollout actor calls it with `llm.collective_rpc("load_weights_from_bytes", ...)`.
The payload crosses vLLM's msgspec boundary, where raw tensors do not
survive but `bytes` do, hence safetensors bytes (one serialisation on the
learner, shared through the Ray object store).
"""
from __future__ import annotations


class WeightReceiver:
    def load_weights_from_bytes(self, payload: bytes) -> int:
        """Reload every tensor named in `payload` (Hugging Face names); returns how many."""
        from safetensors.torch import load

        state = load(payload)
        # `model_runner.model.load_weights` breaks on CPU after the first load;
        # `reload_weights` re-runs the loader in place (../shared/ENVIRONMENT.md).
        self.model_runner.reload_weights(weights_iterator=iter(state.items()))
        return len(state)
