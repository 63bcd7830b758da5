"""ReBalance steering, the pure parts (arXiv 2603.12372; code github.com/yu-lin-li/ReBalance): numpy only.

What the method does, as read from its code (`modeling_utils/modeling_qwen2_dynamic_3D.py`,
`hidden_analysis_auto.py`): logits are never touched. At the input of one decoder layer L the residual stream
at the last position gets h += alpha * S, only when the newest token ends a reasoning step (a token holding a
blank line). S is calibrated offline: mean hidden state at steps that are reflective (a reflection word) or of
low confidence (c < q25 of all steps' confidence), minus the mean at confident steps without reflection words
(c > q75). alpha comes from the running step confidence c and its variance proxy v through a fitted tanh F(c)
plus two gates (`Schedule`): low confidence with high variance (overthinking) pushes hard away from reflection
(alpha -> low2 < 0); high confidence with low variance (underthinking) pushes slightly toward it (alpha -> high2 > 0).

This module owns: step-boundary detection over token texts (`StepTable`), the online per-sequence step state
(`StepTracker`) and its offline replay (`replay`), the alpha schedule (`Schedule`), step labels and the steering
vector (`label_steps`, `steering_vector`), the calibration fit (`fit_schedule`) and layer choice (`ridge_r2`),
and the calibration file (`Calibration`, safetensors + JSON metadata). It does not know torch, HF or vLLM:
`actors.rebalance_hf` (HF forward hook) and `actors.rebalance_vllm` (vLLM worker extension) apply it.

Where this departs from the released code (docs/REBALANCE.md): the model here has no <think> region, so every
generated token may end a step; a blank line split over two "\\n" tokens also ends a step (SmolLM2's tokenizer
writes ".\\n\\n" as ".", "\\n", "\\n"); hidden states are collected at the step-end token itself, the position
that is steered (the released code collects them one token later); step confidence is the mean max-probability
in calibration as in steering (the released calibration uses the geometric mean of sampled-token
probabilities); before the first measured step alpha is 0 (the released code starts at its --steer_coef).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np

STEP_RULES = ("blank_line", "newline")
"""How a token ends a step: `blank_line` (the paper: the token completes a blank line) or `newline` (any line
break; for models that rarely write blank lines)."""

STEERING = ("none", "rebalance")
"""rollout.steering: `none` (plain decoding) or `rebalance` (this module's steering in the rollout engines)."""

GATE_SHARPNESS = 1200.0
"""Slope of the gate sigmoids per inter-quartile range (the released code's 1200: the gates are near-steps)."""

# Reflection words and phrases (the paper's lexicon, abridged): a step holding one is "reflective".
_REFLECTION = ("alternatively", "alternative", "another", "perhaps", "maybe", "wait", "but", "think again",
               "make sure", "ensure", "any other", "some other", "should consider", "whether", "i was", "any errors",
               "or something", "let me check", "let's check", "hold on", "double check", "double-check", "however",
               "confused", "confusing", "differently", "careful", "sometimes", "alternate", "verify", "verified", "recheck", "re-check", "mistake")
_REFLECTION_RE = re.compile(r"\b(?:" + "|".join(re.escape(w).replace(r"\ ", r"[\s-]+") for w in _REFLECTION) + r")\b",
                            re.IGNORECASE)


def is_reflective(text: str) -> bool:
    """True when `text` holds a reflection word or phrase (wait, but, maybe, double check, ...)."""
    return _REFLECTION_RE.search(text.replace("\u2019", "'")) is not None


@dataclass
class StepTable:
    """Per-token-id flags, each of shape (V,), from the decoded text of every token id."""
    blank: np.ndarray
    """The token's own text holds a blank line ("\\n\\n")."""
    starts_nl: np.ndarray
    """Its text starts with "\\n"."""
    ends_nl: np.ndarray
    """Its text ends with "\\n"."""
    rule: str = "blank_line"

    @classmethod
    def from_texts(cls, texts: list[str], rule: str = "blank_line") -> "StepTable":
        if rule not in STEP_RULES:
            raise ValueError(f"unknown step rule {rule!r}; choose one of {', '.join(STEP_RULES)}")
        nl = "\n" if rule == "newline" else "\n\n"
        return cls(blank=np.array([nl in t for t in texts]), starts_nl=np.array([t.startswith("\n") for t in texts]),
                   ends_nl=np.array([t.endswith("\n") for t in texts]), rule=rule)

    def is_end(self, prev: int, tok: int) -> bool:
        """Token `tok` after token `prev` (-1: none) ends a step: it holds a blank line, or it starts one that the
        previous token's trailing "\\n" began (blank_line rule); it holds a line break (newline rule)."""
        if self.blank[tok]:
            return True
        return self.rule == "blank_line" and prev >= 0 and bool(self.starts_nl[tok] and self.ends_nl[prev])

    def ends(self, token_ids, first_prev: int = -1) -> np.ndarray:
        """(T,) bool: which tokens of a sequence end a step; `first_prev` is the token before the first one."""
        prev = np.concatenate([[first_prev], np.asarray(token_ids[:-1], dtype=np.int64)]).astype(np.int64)
        tok = np.asarray(token_ids, dtype=np.int64)
        joined = self.starts_nl[tok] & np.where(prev >= 0, self.ends_nl[np.maximum(prev, 0)], False)
        return self.blank[tok] | (joined if self.rule == "blank_line" else False)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


@dataclass(frozen=True)
class Schedule:
    """alpha(c, v): the steering weight at a step end, from the step confidence c and variance proxy v.

        F(c)   = a + b tanh(k (c - m)),  m = (q25c + q75c) / 2,  s = (q75c - q25c) / 2,
                 a = low1 / 2,  b = -low1 / (2 tanh(k s))          so F(q25c) = low1, F(q75c) = 0,
                 k solved by bisection so that F(1) = tau
        g(x)   = sigmoid(GATE_SHARPNESS * x)
        w_over = min(1, g((q25c - c) / IQRc) g((v - q75v) / IQRv) / (1/4))          low c and high v
        w_undr = min(1, g((c - q75c) / IQRc) g((q25v - v) / IQRv) / (g((1 - q75c) / IQRc) / 2))   high c, low v
        alpha  = scale * clip(F(c) + (low2 - low1) w_over + (high2 - tau) w_undr, min(low1, low2), max(tau, high2))

    alpha < 0 steers away from S (away from reflection), alpha > 0 toward it. `scale` = 0 turns steering off
    (the same positions are steered, by 0)."""
    q25c: float
    q75c: float
    q25v: float
    q75v: float
    low1: float = -1.0
    """F(q25c): steering at a low-confidence step (units of S)."""
    tau: float = 0.01
    """F(1): steering at a fully confident step."""
    low2: float = -2.0
    """Overthinking gate target (low c, high v)."""
    high2: float = 0.1
    """Underthinking gate target (high c, low v)."""
    scale: float = 1.0
    """Multiplies alpha (0: steering off; a sign or strength ablation otherwise)."""

    def __post_init__(self):
        if not (0.0 <= self.q25c < self.q75c < 1.0 and 0.0 <= self.q25v < self.q75v):
            raise ValueError(f"schedule quantiles must satisfy 0 <= q25c < q75c < 1 and 0 <= q25v < q75v; got "
                             f"q25c={self.q25c} q75c={self.q75c} q25v={self.q25v} q75v={self.q75v}")
        if not self.low1 < min(0.0, self.tau):
            raise ValueError(f"schedule low1={self.low1} must be < 0 and < tau={self.tau}")

    def _tanh(self) -> tuple[float, float, float, float]:
        """(a, b, k, m) of F."""
        m, s = (self.q25c + self.q75c) / 2, (self.q75c - self.q25c) / 2
        target = (2 * self.tau - self.low1) / (-self.low1)  # tanh(k(1-m)) / tanh(k s) that gives F(1) = tau
        ratio = lambda k: math.tanh(k * (1 - m)) / math.tanh(k * s)  # noqa: E731 - falls from (1-m)/s to 1 as k grows
        lo, hi = 1e-6, 1.0
        while ratio(hi) > target and hi < 1e6:
            hi *= 2.0
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ratio(mid) > target else (lo, mid)
        k = (lo + hi) / 2
        return self.low1 / 2, -self.low1 / (2 * math.tanh(k * s)), k, m

    def base(self, c) -> np.ndarray:
        """F(c)."""
        a, b, k, m = self._tanh()
        return a + b * np.tanh(k * (np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0) - m))

    def gates(self, c, v) -> tuple[np.ndarray, np.ndarray]:
        """(w_over, w_under), each in [0, 1]."""
        c, v = np.asarray(c, dtype=np.float64), np.asarray(v, dtype=np.float64)
        iqr_c, iqr_v = self.q75c - self.q25c, self.q75v - self.q25v
        g = lambda x: _sigmoid(GATE_SHARPNESS * x)  # noqa: E731
        over = g((self.q25c - c) / iqr_c) * g((v - self.q75v) / iqr_v) / 0.25
        under = g((c - self.q75c) / iqr_c) * g((self.q25v - v) / iqr_v) / (g((1 - self.q75c) / iqr_c) * 0.5)
        return np.minimum(over, 1.0), np.minimum(under, 1.0)

    def __call__(self, c, v) -> np.ndarray:
        over, under = self.gates(c, v)
        alpha = self.base(c) + (self.low2 - self.low1) * over + (self.high2 - self.tau) * under
        return self.scale * np.clip(alpha, min(self.low1, self.low2), max(self.tau, self.high2))


class StepTracker:
    """One sequence's running step state, fed one token at a time (what the steering hooks keep per request).

    `feed(tok, max_prob)` takes the newest token and max_a pi(a | .) of the distribution it was drawn from. A token
    that does not end a step adds its max-prob to the step; a step end closes the step: c = mean max-prob over the
    step's tokens (the step-end token itself not counted), v = (c - c_prev)^2 / 4 (0 at the first step),
    alpha = schedule(c, v), and returns alpha: steer at this token. A step end after an empty step (two blank lines
    in a row) returns the last alpha; before any measured step that is 0."""

    def __init__(self, table: StepTable, schedule: Schedule, prev_token: int = -1):
        self.table, self.schedule, self.prev = table, schedule, prev_token
        self.total, self.count, self.c_prev, self.alpha = 0.0, 0, math.nan, 0.0
        self.steps: list[tuple[float, float, float]] = []
        """(c, v, alpha) of every closed step."""

    def feed(self, tok: int, max_prob: float) -> float | None:
        end, self.prev = self.table.is_end(self.prev, tok), tok
        if not end:
            self.total += max_prob
            self.count += 1
            return None
        if self.count:
            c = self.total / self.count
            v = 0.0 if math.isnan(self.c_prev) else (c - self.c_prev) ** 2 / 4
            self.alpha = float(self.schedule(c, v))
            self.steps.append((c, v, self.alpha))
            self.total, self.count, self.c_prev = 0.0, 0, c
        return self.alpha


def replay(token_ids, max_probs, table: StepTable, schedule: Schedule, first_prev: int = -1) -> dict[int, float]:
    """{index t: alpha} of the generated tokens at which steering applies, t < T - 1 (the last token is never fed
    back into the model). `max_probs[t]` is max_a pi(a | .) of the distribution token t was drawn from."""
    tracker, out = StepTracker(table, schedule, first_prev), {}
    for t, (tok, p) in enumerate(zip(list(token_ids)[:-1], max_probs)):
        alpha = tracker.feed(int(tok), float(p))
        if alpha is not None:
            out[t] = alpha
    return out


def step_segments(token_ids, max_probs, table: StepTable, first_prev: int = -1) -> list[tuple[int, int, float]]:
    """(start, end, c) of each step that a step-end token closes: tokens [start, end) are the step, token `end`
    closes it, c = mean max-prob over [start, end) (steps with no token are skipped)."""
    ends = np.flatnonzero(table.ends(list(token_ids), first_prev))
    out, start = [], 0
    for e in ends:
        if e > start:
            out.append((start, int(e), float(np.mean(np.asarray(max_probs[start:e], dtype=np.float64)))))
        start = int(e) + 1
    return out


def label_steps(conf, reflective, q25: float, q75: float) -> np.ndarray:
    """(N,) int: 1 = reflective or c < q25 (the steps to steer away from), 0 = not reflective and c > q75
    (confident), -1 = neither (dropped), as in the released calibration's "mixed" labels."""
    conf, reflective = np.asarray(conf, dtype=np.float64), np.asarray(reflective, dtype=bool)
    return np.where(reflective | (conf < q25), 1, np.where(conf > q75, 0, -1))


def steering_vector(hidden, labels) -> np.ndarray:
    """S = mean(h | label 1) - mean(h | label 0); hidden (N, D), labels (N,) in {1, 0, -1}; (D,) float32."""
    hidden, labels = np.asarray(hidden, dtype=np.float64), np.asarray(labels)
    pos, neg = hidden[labels == 1], hidden[labels == 0]
    if not len(pos) or not len(neg):
        raise ValueError(f"steering vector needs steps of both kinds; got {len(pos)} reflective/low-confidence and "
                         f"{len(neg)} confident steps: calibrate on more problems")
    return (pos.mean(0) - neg.mean(0)).astype(np.float32)


def variances(conf_per_sequence: list[list[float]]) -> np.ndarray:
    """v = (c_s - c_{s-1})^2 / 4 for every step after the first of each sequence, concatenated."""
    out = [(np.diff(np.asarray(c, dtype=np.float64)) ** 2 / 4) for c in conf_per_sequence if len(c) > 1]
    return np.concatenate(out) if out else np.zeros(0)


def fit_schedule(conf_per_sequence: list[list[float]], **targets) -> Schedule:
    """Schedule with q25c/q75c the quartiles of all steps' confidence and q25v/q75v those of the variance proxy
    (the released calibration's "global quartiles"); `targets` override low1, tau, low2, high2, scale."""
    conf = np.concatenate([np.asarray(c, dtype=np.float64) for c in conf_per_sequence]) if conf_per_sequence else []
    var = variances(conf_per_sequence)
    if len(conf) < 4 or len(var) < 4:
        raise ValueError(f"schedule fit needs at least 4 steps and 4 step pairs; got {len(conf)} steps, {len(var)} "
                         "pairs: calibrate on more problems or a longer token budget")
    q25c, q75c = np.quantile(conf, [0.25, 0.75])
    q25v, q75v = np.quantile(var, [0.25, 0.75])
    q75c = min(max(q75c, q25c + 1e-4), 1 - 1e-6)
    q75v = max(q75v, q25v + 1e-8)
    return Schedule(q25c=float(q25c), q75c=float(q75c), q25v=float(q25v), q75v=float(q75v), **targets)


def ridge_r2(x, y, lam: float = 1.0, test_frac: float = 0.2, seed: int = 0) -> float:
    """Held-out R^2 of a ridge regression y ~ x (features standardised on the training part): how well a layer's
    hidden states at step ends predict step confidence (the released code's layer choice, without its PCA)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, int(round(test_frac * len(y))))
    test, train = order[:n_test], order[n_test:]
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-8
    xt, xv = (x[train] - mu) / sd, (x[test] - mu) / sd
    ym = y[train].mean()
    w = np.linalg.solve(xt.T @ xt + lam * len(train) * np.eye(x.shape[1]), xt.T @ (y[train] - ym))
    pred = xv @ w + ym
    return float(1.0 - ((y[test] - pred) ** 2).sum() / (((y[test] - y[test].mean()) ** 2).sum() + 1e-12))


@dataclass
class Calibration:
    """What `python -m actors.rebalance_calibrate` writes for one model: S and the schedule's constants."""
    vector: np.ndarray
    """S, shape (D,) float32."""
    layer: int
    """Decoder layer whose input gets h += alpha S (= HF `output_hidden_states[layer]`, where S was measured)."""
    schedule: Schedule
    step_rule: str = "blank_line"
    meta: dict = field(default_factory=dict)
    """Model path, problems, counts of labelled steps, layer scores, date."""

    def save(self, path: str) -> None:
        """safetensors file: tensor `vector`, metadata `calibration` (JSON of everything else)."""
        from safetensors.numpy import save_file

        info = {"layer": self.layer, "schedule": asdict(self.schedule), "step_rule": self.step_rule, "meta": self.meta}
        save_file({"vector": np.ascontiguousarray(self.vector, dtype=np.float32)}, path,
                  metadata={"calibration": json.dumps(info)})

    @classmethod
    def load(cls, path: str, **schedule_overrides) -> "Calibration":
        """Read a calibration file; `schedule_overrides` (e.g. scale=0.0) replace schedule fields."""
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            vector = f.get_tensor("vector")
            info = json.loads((f.metadata() or {})["calibration"])
        schedule = Schedule(**{**info["schedule"], **schedule_overrides})
        return cls(vector=vector, layer=int(info["layer"]), schedule=schedule, step_rule=info["step_rule"],
                   meta=info.get("meta", {}))


def check_calibration_file(path) -> None:
    """ValueError (one line) unless `path` is a readable calibration file."""
    import os

    if not path:
        raise ValueError("rollout.steering=rebalance needs rollout.steering_path, a calibration file written by "
                         "`python -m actors.rebalance_calibrate`")
    if not os.path.isfile(os.path.expanduser(str(path))):
        raise ValueError(f"rollout.steering_path={path!r} does not exist; write it with `python -m "
                         "actors.rebalance_calibrate --out <path>`")
