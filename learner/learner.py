"""Learner: one data-parallel rank of a DeepSpeed engine around the policy, a reference policy, one update per call.

A plain class; `learner.group.LearnerGroup` makes `world_size` of them Ray
actors (or runs one in-process). It owns the optimisation (DeepSpeed ZeRO
stage 0-3 from config, fp32 or bf16, gradient accumulation, clipping, a
learning-rate schedule; gloo on CPU, NCCL on GPU), the reference policy
(a frozen copy of the base model or an EMA anchor of the policy), the bad
input guards, checkpoints and the weight export. It does not know where
rollouts came from: branched and root-start samples arrive as the same
TrainBatch (context masked, see learner.objectives).

Data parallelism: every rank receives the whole batch, keeps a contiguous
shard (`shard_indices`), splits it into `grad_accum_steps` micro-batches and
normalises every micro-batch loss by the token count of the *global* batch,
so the update equals the single-rank full-batch update (tested).
"""
from __future__ import annotations

import contextlib
import copy
import glob
import os
import socket
import random
import re
import shutil
import time

from learner.batch import TrainBatch, collate, token_logprobs
from learner.names import DTYPES, KL_MODES
from learner.objectives import kl_penalised_rewards, policy_loss, sequence_advantages
from learner.schedule import lr_factor
from protocol.registry import check

METRICS = ("loss", "pg_loss", "kl", "clip_frac", "ratio_mean")


def _dist_env(rank: int, world_size: int, master_port: int, master_addr: str = "127.0.0.1") -> None:
    """DeepSpeed reads the process layout from the environment; set it before importing it.

    The accelerator is DS_ACCELERATOR when set, else CUDA when this process sees a GPU (a Ray actor
    with num_gpus > 0), else CPU. LOCAL_RANK indexes the GPUs this process sees: Ray gives each rank
    its own, so it is 0 there, and rank mod the GPU count when all ranks see all GPUs."""
    import torch

    n_gpus = torch.cuda.device_count()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if n_gpus else "cpu")
    local_rank = rank % n_gpus if os.environ["DS_ACCELERATOR"] == "cuda" and n_gpus else 0
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Contiguous, near-equal shard of range(n) for `rank` (earlier ranks get the remainder)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


class Learner:
    def __init__(self, *, model_dir: str, learner_cfg, seed: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, master_port: int | None = None, master_addr: str = "127.0.0.1"):
        if master_port is None:  # a single rank: any free port (a fixed one collides with other runs on the machine)
            with socket.socket() as s:
                s.bind((master_addr, 0))
                master_port = s.getsockname()[1]
        _dist_env(rank, world_size, master_port, master_addr)
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        random.seed(seed)
        if learner_cfg.num_threads:
            torch.set_num_threads(int(learner_cfg.num_threads))
        self.cfg = learner_cfg
        self.torch, self.deepspeed = torch, deepspeed
        self.rank, self.world_size, self.model_dir = rank, world_size, model_dir
        self.ga = int(learner_cfg.grad_accum_steps)
        self.bf16 = check("learner dtype", DTYPES, learner_cfg.dtype) == "bfloat16"
        self.zero_stage = learner_cfg.zero_stage
        self.kl_mode = check("KL mode", KL_MODES, learner_cfg.kl_mode)
        self.ref_ema = float(learner_cfg.ref_ema)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.pad_id = model.config.pad_token_id or 0
        # Reference: a frozen copy of the base model (compute dtype), or an EMA anchor kept in fp32.
        self.ref = copy.deepcopy(model).eval().requires_grad_(False)
        if self.bf16 and self.ref_ema == 0.0:
            self.ref = self.ref.to(torch.bfloat16)
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": self.ga,
            "gradient_clipping": learner_cfg.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        # torch AdamW (not DeepSpeed's CPU Adam: no op to compile); ZeRO partitions its state.
        optimizer = torch.optim.AdamW(model.parameters(), lr=learner_cfg.lr, weight_decay=learner_cfg.weight_decay)
        sched_kw = dict(schedule=learner_cfg.lr_schedule, warmup_steps=learner_cfg.warmup_steps,
                        decay_steps=learner_cfg.decay_steps, min_ratio=learner_cfg.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, **sched_kw))
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                                 config=ds_config)
        self.engine.checkpoint_engine = _weights_only_checkpoint_engine(self.engine._config)
        self.device = self.engine.device  # batches and the reference live here; metrics and weights out go to the CPU
        self.ref = self.ref.to(self.device)
        self.version = 0
        self.rejected_batches = 0
        self.skipped_steps = 0
        self.weight_transfer = None
        """vLLM's trainer-side weight-transfer engine (rollout.weight_transport nccl / ipc), once initialised."""

    # ---- collectives -------------------------------------------------------------------------------
    def _all_sum(self, x):
        """Sum of a CPU tensor over ranks (through the accelerator: NCCL reduces only GPU tensors)."""
        if self.world_size > 1:
            y = x.to(self.device)
            self.torch.distributed.all_reduce(y)
            x = y.cpu()
        return x

    def _all_finite(self, loss) -> bool:
        """True iff the loss is finite on every rank (all ranks take the same skip decision)."""
        bad = self.torch.tensor([0.0 if bool(self.torch.isfinite(loss)) else 1.0])
        return float(self._all_sum(bad)) == 0.0

    @contextlib.contextmanager
    def _full_params(self, modify: bool = False):
        """Whole (unpartitioned) policy parameters inside the block; a collective under ZeRO-3."""
        if self.zero_stage == 3:
            params = list(self.engine.module.parameters())
            with self.deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
                yield
        else:
            yield

    # ---- update ------------------------------------------------------------------------------------
    def _micro_tensors(self, batch: TrainBatch):
        if len(batch) == 0:  # an empty shard still takes part in the collectives, with zero weight
            t = collate(TrainBatch([[self.pad_id]], [[self.pad_id]], [[0.0]], [0.0], [0]), self.pad_id)
            t["mask"].zero_()
        else:
            t = collate(batch, self.pad_id)
        return {k: v.to(self.device) for k, v in t.items()}

    def _logp(self, model, t):
        """log pi(x_j | x_<j) at the continuation positions (B, T), fp32.

        The output layer runs only on the last `keep` positions, from the one that predicts the first continuation
        token of the row with the shortest context: the context (prompt + stored prefix) is never trained on, and
        with a 49K vocabulary its (B, L, V) logits would be most of the update's memory and a large share of its
        compute."""
        length = t["input_ids"].size(1)
        keep = length - int(t["context_len"].min()) + 1
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], logits_to_keep=keep).logits
        return token_logprobs(logits, t["input_ids"], t["cont_index"], offset=length - keep)  # (B, T), fp32

    def _ref_logp(self, t):
        with self.torch.no_grad():
            return self._logp(self.ref, t)

    def _kl_reward_advantages(self, batch: TrainBatch, shard: list[int], micro_idx, micros, refs):
        """KL in the reward: r' = r - beta * sum_t k(behaviour, ref) for every sample (gathered over ranks), then the baseline."""
        torch = self.torch
        if batch.rewards is None or batch.group_ids is None:
            raise ValueError("learner.kl_mode=reward needs TrainBatch.rewards and group_ids (build_train_batch sets them)")
        if batch.token_advantages is not None:
            raise ValueError("learner.kl_mode=reward is not defined for per-token (soft_value) advantages; use kl_mode=loss")
        pen = torch.zeros(len(batch), dtype=torch.float64)
        for idx, t, ref in zip(micro_idx, micros, refs):
            if idx:
                r = torch.zeros(len(idx), dtype=torch.float64)
                shaped = kl_penalised_rewards(r, t["behaviour"].double().cpu(), ref.double().cpu(), t["mask"].double().cpu(),
                                              kl_coef=self.cfg.kl_coef, estimator=self.cfg.kl_estimator)
                pen[[shard[i] for i in idx]] = shaped  # = -beta * KL_i
        pen = self._all_sum(pen)
        rewards = torch.tensor(batch.rewards, dtype=torch.float64) + pen
        adv = sequence_advantages(rewards, torch.tensor(batch.group_ids), self.cfg.advantage, nudge=self.cfg.nudge)
        for idx, t in zip(micro_idx, micros):
            if idx:
                t["advantages"] = adv[[shard[i] for i in idx]].float().to(self.device)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One KL-regularised update on the (global) `batch`; returns global learner/ metrics on every rank.

        Rejected without touching the model: a batch with non-finite logprobs,
        advantages or rewards (counted in learner/rejected_batches). Skipped
        with weights and optimizer state unchanged: a step whose loss is
        non-finite on any rank or micro-batch, or whose gradients are (DeepSpeed
        then leaves the weights alone; learner/skipped_steps). With
        grad_accum_steps > 1 the losses are checked in a no-grad pass first,
        so no gradient is accumulated before the decision.
        """
        torch, t0 = self.torch, time.perf_counter()
        counters = {"learner/rejected_batches": self.rejected_batches, "learner/skipped_steps": self.skipped_steps,
                    "learner/version": self.version}
        if len(batch) == 0 or not batch.is_finite():
            self.rejected_batches += 1
            return {**counters, "learner/rejected_batches": self.rejected_batches}
        n_tokens = float(sum(len(t) for t in batch.token_ids))
        shard = shard_indices(len(batch), self.rank, self.world_size)
        local = batch.select(shard)
        micro_idx = [shard_indices(len(local), k, self.ga) for k in range(self.ga)]
        micros = [self._micro_tensors(local.select(idx)) for idx in micro_idx]
        refs = [self._ref_logp(t) for t in micros]
        kl_coef = self.cfg.kl_coef
        if self.kl_mode == "reward":
            self._kl_reward_advantages(batch, shard, micro_idx, micros, refs)
            kl_coef = 0.0
        loss_kw = dict(clip_ratio=self.cfg.clip_ratio, kl_coef=kl_coef, kl_estimator=self.cfg.kl_estimator, denom=n_tokens)

        self.engine.train()
        if self.ga > 1:  # decide the skip before any gradient is accumulated
            with torch.no_grad():
                ok = all(self._all_finite(policy_loss(self._logp(self.engine, t), t["behaviour"], ref, t["advantages"], t["mask"],
                                                      **loss_kw)[0]) for t, ref in zip(micros, refs))
            if not ok:
                return self._skip(counters)
        sums = torch.zeros(len(METRICS), dtype=torch.float64)
        for t, ref in zip(micros, refs):
            logp = self._logp(self.engine, t)
            loss, info = policy_loss(logp, t["behaviour"], ref, t["advantages"], t["mask"], **loss_kw)
            if self.ga == 1 and not self._all_finite(loss):
                return self._skip(counters)
            # DeepSpeed averages gradients over ranks; the loss is already a share of the global token mean.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            self.engine.step()
            sums += torch.tensor([float(loss.detach())] + [float(info[k]) for k in METRICS[1:]], dtype=torch.float64)
        if not self.engine.was_step_applied():  # a finite loss with non-finite gradients: DeepSpeed skipped the step
            return self._skip(counters)
        self.version += 1
        if self.ref_ema > 0:
            self._update_ema()
        sums = self._all_sum(sums)
        grad_norm = self.engine.get_global_grad_norm()
        return {**counters, "learner/version": self.version, **{f"learner/{k}": float(v) for k, v in zip(METRICS, sums)},
                "learner/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "learner/tokens": n_tokens, "learner/lr": float(self.scheduler.get_last_lr()[0]),
                "learner/compute_s": time.perf_counter() - t0}

    def train_step_and_export(self, batch: TrainBatch):
        """(`train_step(batch)`, `weights_packed()`): the update and the weights it produced, in one call."""
        metrics = self.train_step(batch)
        return metrics, self.weights_packed()

    def _skip(self, counters: dict) -> dict[str, float]:
        self.skipped_steps += 1
        return {**counters, "learner/skipped_steps": self.skipped_steps}

    def _update_ema(self) -> None:
        """EMA anchor (online RLHF): ref <- (1 - a) ref + a pi after each update, in fp32."""
        torch = self.torch
        with torch.no_grad(), self._full_params():
            for p_ref, p in zip(self.ref.parameters(), self.engine.module.parameters()):
                p_ref.lerp_(p.detach().float(), self.ref_ema)

    # ---- weights out -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The policy's full state dict (Hugging Face names, fp32 copies); a collective under ZeRO-3."""
        with self._full_params():
            return {k: v.detach().to("cpu", self.torch.float32, copy=True).contiguous()
                    for k, v in self.engine.module.state_dict().items()}

    def weights_bytes(self) -> bytes:
        """The policy's state dict as safetensors bytes, for the rollout engines (b"" off rank 0)."""
        from safetensors.torch import save

        state = self.state_dict()
        return save(state) if self.rank == 0 else b""

    def weights_packed(self):
        """The same safetensors format as `weights_bytes`, as `PackedWeights`: header + uint8 views of the fp32
        parameters (None off rank 0). Returned through Ray, the tensors are copied once, into the object store,
        and readers get them without a copy; `weights_bytes` costs a clone, a serialiser and a copy per reader."""
        from actors.weight_transport import pack_weights

        with self._full_params():
            if self.rank != 0:
                return None
            state = self.engine.module.state_dict()
            if self.zero_stage == 3 or self.device.type != "cpu":
                # a copy on the CPU: gathered ZeRO-3 parameters go at the end of the block, GPU memory cannot be viewed
                state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
            return pack_weights(state, dtype=self.torch.float32)

    # ---- weights out through vLLM's weight-transfer engines (rollout.weight_transport nccl / ipc) ----------
    def init_weight_transfer(self, transport: str, client, *, world_size: int, master_address: str | None,
                             master_port: int | None, buffer_bytes: int) -> None:
        """vLLM's trainer-side engine of `transport`, built by `WeightTransferTrainerFactory.trainer_init` on every rank.

        Rank 0 is the sender: it drives the engines' side through `client` (`actors.weight_sync.RolloutSyncClient`);
        nccl: it opens NCCL rank 0 of `world_size` at master_address:master_port while the engines join. The other
        ranks take part in the gathers (ZeRO-3) and, for ipc, the handle all-gather. GPU only."""
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        from actors.weight_transport import trainer_init_info

        info = trainer_init_info(transport, rank=self.rank, world_size=world_size, master_address=master_address,
                                 master_port=master_port, buffer_bytes=buffer_bytes)
        self.weight_transfer = WeightTransferTrainerFactory.trainer_init(
            info, client=client, source=self.weight_source(keep=transport == "ipc"))

    def send_weights(self, version: int) -> None:
        """One push through the transfer engine (every rank calls it): vLLM's `send_weights` runs the engines'
        start / update / finish; they adopt `version`."""
        if self.weight_transfer is None:
            raise RuntimeError("Learner.send_weights before init_weight_transfer")
        self.weight_transfer.client.version = version  # vLLM's trainer calls finish_weight_update() without one
        self.weight_transfer.send_weights()

    def weight_source(self, keep: bool = False):
        """The policy's state dict as vLLM's `WeightSource` (Hugging Face names, the learner's device and dtype, no
        copies): `metadata()` reads shapes without gathering (ZeRO-3: `ds_shape`), iteration gathers under ZeRO-3.
        keep=True: under ZeRO-3, clones that outlive the gather (ipc hands the engines pointers into them after the
        iteration has ended)."""
        from vllm.distributed.weight_transfer import ParamMeta, WeightSource

        learner = self

        class PolicyWeights(WeightSource):
            def metadata(self):
                return [ParamMeta(k, v.dtype, tuple(getattr(v, "ds_shape", v.shape)))
                        for k, v in learner.engine.module.state_dict(keep_vars=True).items()]

            def __iter__(self):
                clone = keep and learner.zero_stage == 3
                with learner._full_params():
                    for k, v in learner.engine.module.state_dict().items():
                        yield k, (v.detach().clone() if clone else v.detach())

        return PolicyWeights()

    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """log pi(x_t | x_<t) for t >= 1 under the current policy (every rank must call it under ZeRO-3)."""
        torch = self.torch
        with torch.no_grad():
            ids = torch.tensor([token_ids], device=self.device)
            logp = torch.log_softmax(self.engine.module(input_ids=ids).logits.float(), -1)[0, :-1]
            return logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1).tolist()

    def teacher_forced_logprob(self, token_ids: list[list[int]], first: list[int], horizon: int,
                               batch_size: int = 256) -> list[float]:
        """log prod_{i < H} pi(x_{f+i} | x_{<f+i}) of each sequence (prompt + right answer, answer at f = first[j])
        under the current policy: `learner.exact_success.teacher_forced_logprob`, one forward pass per sequence,
        `batch_size` sequences at a time, right-padded (every rank must call it under ZeRO-3)."""
        from learner.exact_success import teacher_forced_logprob

        torch, out = self.torch, []
        with torch.no_grad():
            for k in range(0, len(token_ids), batch_size):
                rows = token_ids[k: k + batch_size]
                ids = torch.full((len(rows), max(map(len, rows))), self.pad_id, dtype=torch.long)
                for j, r in enumerate(rows):
                    ids[j, : len(r)] = torch.tensor(r)
                ids = ids.to(self.device)  # (B, L)
                logits = self.engine.module(input_ids=ids).logits  # (B, L, V); causal: the padding is never attended
                f = torch.tensor(first[k: k + batch_size], device=self.device)
                out += teacher_forced_logprob(logits, ids, f, horizon).tolist()
        return out

    def get_version(self) -> int:
        return self.version

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, ckpt_dir: str, *, extra: dict | None = None, keep: int = 2, hf: bool = True,
                        commit: bool = True) -> str:
        """Save <ckpt_dir>/step<version>/: DeepSpeed state (optimizer, scheduler, step), per-rank RNG,
        the reference (if EMA), counters, `extra` (the driver's data position), and an `hf/` folder
        that transformers and vLLM load. Every rank must call it. Nothing is pickled but tensors and
        containers (see `safe_load`); RNG and EMA reference are safetensors.

        commit=True: point <ckpt_dir>/latest at it and keep the newest `keep` (commit_checkpoint);
        commit=False leaves that to the caller, who adds its own files first (the driver: store shards),
        so a process killed mid-write leaves `latest` on the previous complete checkpoint."""
        from safetensors.torch import save_model

        tag = f"step{self.version:08d}"
        client = {"graftrl": {"version": self.version, "rejected_batches": self.rejected_batches,  # one key: no clash with DS's
                              "skipped_steps": self.skipped_steps, "extra": extra or {}}}
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client, save_latest=False)
        path = os.path.join(ckpt_dir, tag)
        save_rng(os.path.join(path, f"rng_rank{self.rank}.safetensors"))
        if self.rank == 0 and self.ref_ema > 0:
            save_model(self.ref, os.path.join(path, "ref_ema.safetensors"))
        if hf:
            self.save_hf(os.path.join(path, "hf"))
        if self.world_size > 1:
            self.torch.distributed.barrier()
        if self.rank == 0 and commit:
            commit_checkpoint(ckpt_dir, tag, keep=keep)
        return path

    def save_hf(self, out_dir: str) -> None:
        """A Hugging Face folder (config, safetensors, tokenizer files of the base) of the current policy."""
        state = self.state_dict()
        if self.rank != 0:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        for f in os.listdir(self.model_dir):  # tokenizer and generation files of the base model
            src = os.path.join(self.model_dir, f)
            if os.path.isfile(src) and not f.endswith((".safetensors", ".bin", ".pt")) and f != "config.json" \
                    and not f.startswith("model.safetensors") and not os.path.exists(os.path.join(out_dir, f)):
                shutil.copy2(src, out_dir)

    def load_checkpoint(self, ckpt_dir: str, tag: str | None = None) -> dict:
        """Restore a checkpoint written by save_checkpoint (tag None: the committed latest); returns its `extra`.

        Every file is loaded weights-only (`safe_load`) or as safetensors: a file holding any other
        pickled object is refused with UnsafeCheckpoint before anything in it runs."""
        from safetensors.torch import load_model

        if tag is None:
            tag = latest_tag(ckpt_dir)
        tag_dir = os.path.join(ckpt_dir, tag)
        rng_path = os.path.join(tag_dir, f"rng_rank{self.rank}.safetensors")
        if not os.path.isfile(rng_path):
            raise CheckpointError(f"{tag_dir}: incomplete checkpoint (no rng_rank{self.rank}.safetensors); "
                                  "resume from an earlier one or start the run again")
        path, client_states = self.engine.load_checkpoint(ckpt_dir, tag=tag)
        if path is None:
            raise CheckpointError(f"no DeepSpeed checkpoint under {ckpt_dir!r} (tag {tag!r})")
        load_rng(rng_path)
        if self.ref_ema > 0:
            load_model(self.ref, os.path.join(tag_dir, "ref_ema.safetensors"))
        client = client_states["graftrl"]
        self.version = client["version"]
        self.rejected_batches, self.skipped_steps = client["rejected_batches"], client["skipped_steps"]
        return client.get("extra", {})


# ---- checkpoint files (no pickle) ----------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored (incomplete, missing); the message names the folder."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file holds a pickled object other than tensors and plain containers; it is not loaded."""


def commit_checkpoint(ckpt_dir: str, tag: str, *, keep: int) -> None:
    """Point <ckpt_dir>/latest at `tag` (atomic rename), then delete all but the newest `keep` checkpoints."""
    tmp = os.path.join(ckpt_dir, "latest.tmp")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(ckpt_dir, "latest"))
    for old in sorted(glob.glob(os.path.join(ckpt_dir, "step*")))[:-keep] if keep > 0 else []:
        if os.path.basename(old) != tag:
            shutil.rmtree(old, ignore_errors=True)


def latest_tag(ckpt_dir: str) -> str:
    """The committed checkpoint's tag (<ckpt_dir>/latest)."""
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            return f.read().strip()
    except FileNotFoundError:
        raise CheckpointError(f"no committed checkpoint under {ckpt_dir!r} (no 'latest' file)") from None


def save_rng(path: str) -> None:
    """torch (CPU and, when in use, CUDA), numpy and Python RNG states as safetensors (tensors) plus JSON metadata (scalars)."""
    import json

    import numpy as np
    import torch
    from safetensors.torch import save_file

    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
               "python_state": torch.tensor(py_internal, dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {"numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)], "python": [py_version, py_gauss]}
    save_file(tensors, path, metadata={"graftrl_rng": json.dumps(meta)})


def load_rng(path: str) -> None:
    """Inverse of save_rng: sets the torch, numpy and Python RNG states of this process."""
    import json

    import numpy as np
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["graftrl_rng"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    torch.set_rng_state(t["torch"])
    if "cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["cuda"])
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, t["numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    py_version, py_gauss = meta["python"]
    random.setstate((py_version, tuple(t["python_state"].tolist()), py_gauss))


def safe_load(path: str, map_location=None):
    """torch.load, weights-only: tensors, plain containers and the three DeepSpeed classes its optimizer
    state holds (loss scaler, ZeRO stage enum, fragment address; rebuilt from their fields, no code run).
    A file with any other pickled object raises UnsafeCheckpoint naming the file and the object."""
    import pickle

    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = found.group(1) if found else str(e).strip().splitlines()[0][:120]
        raise UnsafeCheckpoint(f"{path}: refused to load: it holds a pickled {what}, not only tensors and plain "
                               "containers; load only checkpoints written by graftrl") from None


def _weights_only_checkpoint_engine(config):
    """DeepSpeed's torch checkpoint engine with every load through `safe_load` (DeepSpeed itself loads
    with weights_only=False, which runs whatever a pickled object asks for)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    return WeightsOnlyCheckpointEngine(config)
