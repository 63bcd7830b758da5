"""Learner: a DeepSpeed engine around the policy, a frozen reference copy, one update per call.

A plain class; `learner.group.LearnerGroup` makes it a Ray actor. It owns
the optimisation (DeepSpeed ZeRO stage from config; gloo on CPU, NCCL on
GPU) and the weight export. It does not know where rollouts came from:
branched and root-start samples arrive as the same TrainBatch.
"""
from __future__ import annotations

import copy
import io
import os

from learner.batch import TrainBatch, collate, token_logprobs
from learner.objectives import policy_loss


def _dist_env(rank: int, world_size: int, master_port: int) -> None:
    """DeepSpeed reads the process layout from the environment; set it before importing it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0" if os.environ["DS_ACCELERATOR"] == "cpu" else str(rank))


class Learner:
    def __init__(self, *, model_dir: str, learner_cfg, seed: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, master_port: int = 29611):
        _dist_env(rank, world_size, master_port)
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.cfg = learner_cfg
        self.torch = torch
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.pad_id = model.config.pad_token_id or 0
        self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": learner_cfg.grad_clip,
            "zero_optimization": {"stage": learner_cfg.zero_stage},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=learner_cfg.lr, weight_decay=0.0)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.version = 0
        self.rejected_batches = 0
        self.skipped_steps = 0

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One KL-regularised update on `batch`; returns learner/ metrics."""
        torch = self.torch
        if not batch.is_finite():
            self.rejected_batches += 1
            return {"learner/rejected_batches": self.rejected_batches}
        t = collate(batch, self.pad_id)
        self.engine.train()
        logits = self.engine(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits  # (B, L, V)
        logp = token_logprobs(logits, t["input_ids"], t["cont_index"])  # (B, T)
        with torch.no_grad():
            ref_logits = self.ref(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
            ref_logp = token_logprobs(ref_logits, t["input_ids"], t["cont_index"])
        loss, info = policy_loss(logp, t["behaviour"], ref_logp, t["advantages"], t["mask"],
                                 clip_ratio=self.cfg.clip_ratio, kl_coef=self.cfg.kl_coef,
                                 kl_estimator=self.cfg.kl_estimator)
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            return {"learner/skipped_steps": self.skipped_steps}
        self.engine.backward(loss)
        self.engine.step()
        self.version += 1
        grad_norm = self.engine.get_global_grad_norm()
        return {"learner/loss": float(loss.detach()), **{f"learner/{k}": float(v) for k, v in info.items()},
                "learner/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "learner/tokens": float(t["mask"].sum()), "learner/version": self.version}

    def weights_bytes(self) -> bytes:
        """The policy's state dict (Hugging Face names) as safetensors bytes, for the rollout engines."""
        from safetensors.torch import save

        state = {k: v.detach().contiguous() for k, v in self.engine.module.state_dict().items()}
        return save(state)

    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """log pi(x_t | x_<t) for t >= 1 under the current policy."""
        torch = self.torch
        with torch.no_grad():
            logits = self.engine.module(input_ids=torch.tensor([token_ids])).logits
            logp = torch.log_softmax(logits.float(), -1)[0, :-1]
            return logp.gather(-1, torch.tensor(token_ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()

    def get_version(self) -> int:
        return self.version
