"""The names the learner's config fields accept, readable without torch.

launch/config.py validates `learner.advantage`, `learner.kl_estimator`,
`learner.kl_mode`, `learner.dtype`, `learner.signal` and `preference.query_selection` against these before anything heavy is
imported: importing torch (which learner/objectives.py needs) takes about 2 s
on 2 cores, several times the rest of the CLI's one-line answer to a typo.
The implementations live in learner/objectives.py, keyed by these names; it
checks on import that its registries hold exactly these names.
(Learning-rate schedules need no split: learner/schedule.py is pure Python.)
"""
from __future__ import annotations

ADVANTAGES = ("group", "group_norm", "rloo", "soft_value")
"""`group`: r - mean of the sibling group (Dr. GRPO); `group_norm`: also / std (GRPO);
`rloo`: r - mean of the *other* members (REINFORCE leave-one-out); `soft_value`: per-token V(s+a) - V(s).
The first three are `objectives.SEQUENCE_ADVANTAGES`; `soft_value` is `objectives.soft_value_advantages`."""
KL_ESTIMATORS = ("k1", "k2", "k3")
"""Per-token estimators of KL(pi || pi_ref): `objectives.KL_ESTIMATORS` (which KL each one's gradient follows, in the
reward or the loss, is in its docstring; k1 in the reward is the stated objective's)."""
KL_MODES = ("loss", "reward")
"""`loss`: beta * k(logp, ref) per token added to the loss; `reward`: r - beta * sum_t k(behaviour_t, ref_t)."""
DTYPES = ("float32", "bfloat16")
"""Learner compute dtype: float32, or bfloat16 (DeepSpeed bf16, fp32 master weights in the optimizer)."""
SIGNALS = ("reward", "preference")
"""`reward`: the task's outcome reward; `preference`: p(Y > Y') - 1/2 from the reward model of learner/rm_phase.py."""
QUERY_SELECTIONS = ("uncertainty", "random", "double_thompson")
"""Which pair the rater is asked about: `learner.query_selection.SELECTORS`."""
PREFERENCE_MODES = ("online", "offline")
"""`online`: queries and reward-model updates every step; `offline`: all labels from the base policy, once."""
