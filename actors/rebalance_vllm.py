"""ReBalance steering inside the vLLM engine: a worker extension that hooks one decoder layer and keeps each
request's step state (rollout.steering=rebalance).

vLLM (0.32, V1) runs every scheduled token of every request in one flattened forward. The worker's model runner
holds, for that forward, the requests in batch order (`input_batch.req_ids[:num_reqs]`), where each one's tokens
start (`query_start_loc.np`), how many of its tokens were computed before (`input_batch.num_computed_tokens_cpu`)
and its prompt length (`input_batch.num_prompt_tokens`). Three hooks use them:

    embed_tokens pre-hook   the newest token of request i sits at flat row q[i+1]-1, sequence index
                            computed_i + scheduled_i - 1; a generated token (index >= prompt length) is fed to
                            that request's `StepTracker` with the max-prob of the distribution it was drawn
                            from; a step end gives the row and alpha to steer
    layer L pre-hook        hidden_states[row] += alpha * S (vLLM's Llama layer takes (positions, hidden, residual)
                            and its fused add-norm sums hidden + residual: adding to hidden adds to the stream)
    compute_logits wrapper  row i of the logits belongs to request i: its max softmax probability is kept for
                            the token sampled from it

`execute_model` is wrapped to drop the state of finished requests. The prompt (prompt + stored prefix for a
branch request) is never steered: the state starts at the first generated token, the prompt's last token being
the token before it. Tested on CPU (no async scheduling, eager mode, no speculative decoding); the rollout worker
sets `async_scheduling=False` when steering is on, and the config requires `rollout.enforce_eager`.
Known inexactness: a preempted request is recomputed from its tokens, and that prefill is not steered, so the KV
of its earlier step ends is the unsteered one (the released code has no preemption); prefix-cache hits on a
stored prefix that was generated with steering reuse steered KV, misses recompute it unsteered.
"""
from __future__ import annotations

from actors.weight_receiver import WeightReceiver


class RebalanceSteering:
    """Mixin of the engine worker (`self.model_runner` is vLLM's model runner)."""

    def rebalance_setup(self, path: str, scale: float = 1.0, record: bool = False) -> int:
        """Load the calibration file, install the hooks (once); `scale` multiplies alpha (0: steer by 0);
        `record` keeps a log of every steered token for `rebalance_log`. Returns the steering layer."""
        import torch
        from transformers import AutoTokenizer

        from actors.rebalance import Calibration
        from actors.rebalance_hf import step_table

        cal = Calibration.load(path, scale=scale)
        runner = self.model_runner
        model = runner.get_model()
        if getattr(self, "_rb", None) is None:
            tok = AutoTokenizer.from_pretrained(runner.model_config.tokenizer)
            self._rb_table_cache = {}
            self._rb_tokenizer = tok
            self._rb = {"states": {}, "rows": [], "alphas": [], "log": [], "active": False}
            self._rb_install(model)
        if cal.step_rule not in self._rb_table_cache:
            self._rb_table_cache[cal.step_rule] = step_table(self._rb_tokenizer, cal.step_rule)
        layers = model.model.layers
        if not 0 <= cal.layer < len(layers):
            raise ValueError(f"calibration layer {cal.layer} outside this model's {len(layers)} layers")
        self._rb.update(cal=cal, table=self._rb_table_cache[cal.step_rule], record=record, enabled=True, states={},
                        vector=torch.as_tensor(cal.vector), layer=cal.layer, log=[])
        return cal.layer

    def rebalance_disable(self) -> None:
        """Hooks stay, but do nothing (plain decoding)."""
        if getattr(self, "_rb", None) is not None:
            self._rb.update(enabled=False, states={})

    def rebalance_log(self, reset: bool = True) -> list:
        """[(request id, sequence index of the steered token, token id, alpha)] since the last reset."""
        log = list(self._rb["log"])
        if reset:
            self._rb["log"] = []
        return log

    # ----- hooks -----
    def _rb_install(self, model) -> None:
        runner, rb = self.model_runner, self._rb
        original_execute = runner.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            for req_id in getattr(scheduler_output, "finished_req_ids", ()) or ():
                rb["states"].pop(req_id, None)
            rb["active"] = True
            try:
                return original_execute(scheduler_output, *args, **kwargs)
            finally:
                rb["active"] = False

        runner.execute_model = execute_model

        def on_embed(module, args):
            rb["rows"], rb["alphas"] = [], []
            if not (rb["active"] and rb.get("enabled")):
                return None
            self._rb_plan(args[0])
            return None

        model.model.embed_tokens.register_forward_pre_hook(on_embed)
        for index, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(self._rb_layer_hook(index))
        original_logits = model.compute_logits

        def compute_logits(hidden_states, *args, **kwargs):
            logits = original_logits(hidden_states, *args, **kwargs)
            if rb["active"] and rb.get("enabled") and logits is not None:
                self._rb_keep_max_probs(logits)
            return logits

        model.compute_logits = compute_logits

    def _rb_plan(self, input_ids) -> None:
        """Feed each request's newest generated token to its tracker; rows and alphas to steer in this forward."""
        from actors.rebalance import StepTracker

        rb, runner = self._rb, self.model_runner
        rb["rows"], rb["alphas"] = [], []
        batch = runner.input_batch
        n = batch.num_reqs
        starts = runner.query_start_loc.np[: n + 1]
        ids = input_ids.tolist()
        for i, req_id in enumerate(batch.req_ids[:n]):
            row = int(starts[i + 1]) - 1
            if row < int(starts[i]) or row >= len(ids):
                continue
            index = int(batch.num_computed_tokens_cpu[i]) + int(starts[i + 1] - starts[i]) - 1
            tok = ids[row]
            state = rb["states"].get(req_id)
            if state is None:
                state = rb["states"][req_id] = [StepTracker(rb["table"], rb["cal"].schedule), None]
            tracker, pending = state
            if index < int(batch.num_prompt_tokens[i]) or pending is None:
                tracker.prev = tok  # a prompt token: the state starts after it
                continue
            alpha = tracker.feed(tok, pending)
            if alpha is not None:
                rb["rows"].append(row)
                rb["alphas"].append(alpha)
                if rb["record"]:
                    rb["log"].append((req_id, index, tok, alpha))

    def _rb_keep_max_probs(self, logits) -> None:
        import torch

        rb, batch = self._rb, self.model_runner.input_batch
        n = batch.num_reqs
        if logits.shape[0] != n:  # speculative decoding or a dummy run: rows are not one per request
            return
        max_probs = torch.softmax(logits.float(), dim=-1).max(dim=-1).values.tolist()
        for i, req_id in enumerate(batch.req_ids[:n]):
            state = rb["states"].get(req_id)
            if state is not None:
                state[1] = max_probs[i]

    def _rb_layer_hook(self, index: int):
        rb = self._rb

        def hook(module, args):
            if index != rb.get("layer") or not rb["rows"]:
                return None
            import torch

            positions, hidden, *rest = args
            delta = torch.zeros_like(hidden)  # (num_tokens, D)
            alphas = torch.tensor(rb["alphas"], dtype=hidden.dtype, device=hidden.device)
            delta[torch.tensor(rb["rows"], device=hidden.device)] = alphas[:, None] * rb["vector"].to(hidden)
            return (positions, hidden + delta, *rest)

        return hook


class SteeredWeightReceiver(WeightReceiver, RebalanceSteering):
    """The worker extension of a steering rollout engine: weight loading (`WeightReceiver`) plus ReBalance."""
