"""graftrl training driver: KL-regularised RL with prefix access.

    python -m launch.train --config configs/default.yaml [key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m launch.train --config configs/default.yaml

The command line around `launch.trainer.Trainer` (one step: select branch points
and prompts -> generate -> insert into the store -> drop stale samples -> build the
batch -> KL-regularised update -> push weights): config loading and validation,
the run folder, resume, Ctrl-C, and one-line errors when a process of the run dies.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time

from launch.base_model import check_task
from launch.config import Config, ConfigError, load_config, save_config
from launch.report import print_summary, write_summary
from launch.trainer import STOP, Components, Trainer, start_components


def train(cfg: Config, run_dir: str, log=print, resume: bool = False) -> dict:
    """Start the components, run the Trainer, always stop the actors and Ray (also on errors and Ctrl-C)."""
    import ray

    t_start, trainer = time.time(), None
    try:
        comp = start_components(cfg, log)
        try:
            write_pids(run_dir, comp)
            trainer = Trainer(comp, cfg, run_dir, log)
            return trainer.run(resume=resume, t_start=t_start)
        finally:
            comp.rollout.shutdown()
            comp.learner.shutdown()
    except Exception as e:  # what the run was doing, and which actor died while Ray can still say: notes for one line
        e.add_note(PHASE_NOTE + (trainer.phase if trainer else "the start-up (rollout actors, prefix store, learner)"))
        if getattr(e, "actor_id", None):
            e.add_note(ACTOR_NOTE + ray_actor_record(e.actor_id))
        raise
    finally:
        ray.shutdown()


PHASE_NOTE, ACTOR_NOTE = "[graftrl] phase: ", "[graftrl] actor: "


def ray_actor_record(actor_id: str) -> str:
    """Class and pid of a Ray actor from Ray's actor table (Ray's ActorUnavailableError names neither)."""
    try:
        from ray._private.state import actors as actor_table

        rec = actor_table(actor_id)
        return f"{rec['ActorClassName']}, pid {rec.get('Pid') or '?'}, {rec['State']}"
    except Exception:  # noqa: BLE001 - Ray down or the table's layout moved: the error's own text is all there is
        return ""


def write_pids(run_dir: str, comp: Components) -> None:
    """runs/<id>/pids.json: the process ids of the driver, the learner ranks, the rollout actors and the store's
    shards at the start of the run (fault tests, ops)."""
    pids = {"driver": os.getpid(), "learner": list(comp.learner.pids), "rollout": comp.rollout.pids(),
            "store": comp.store.pids()}
    with open(os.path.join(run_dir, "pids.json"), "w") as f:
        json.dump(pids, f)


def new_run_dir(cfg: Config) -> str:
    run_id = cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(cfg.run_dir, run_id)
    if os.path.exists(run_dir):
        raise ConfigError(f"run directory {run_dir!r} already exists; choose another run_name")
    return run_dir


def parse_resume(overrides: list[str]) -> tuple[str | None, list[str]]:
    """`resume=runs/<id>` is not a config key: it names the run to continue."""
    rest = [o for o in overrides if not o.startswith("resume=")]
    resumes = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    if not resumes:
        return None, rest
    run_dir = resumes[-1].rstrip("/")
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise ConfigError(f"resume={run_dir!r}: no run there (expected {run_dir}/config.yaml); give a folder under runs/")
    if not os.path.isfile(os.path.join(run_dir, "checkpoints", "latest")):
        raise ConfigError(f"resume={run_dir!r}: the run has no checkpoint yet; start it again instead")
    return run_dir, rest


def component_died(e: Exception) -> str | None:
    """One line naming the process that died and what the run was doing, when `e` says a learner rank or another
    actor of the run died (`train` notes the phase, and the class and pid of an actor Ray's error does not name)."""
    from ray.exceptions import OutOfMemoryError, RayActorError

    from actors.group import RolloutActorLost
    from learner.group import LearnerDied

    notes = {n.split(": ", 1)[0] + ": ": n.split(": ", 1)[1] for n in getattr(e, "__notes__", ()) if ": " in n}
    if isinstance(e, (LearnerDied, RolloutActorLost)):
        line = str(e)
    elif isinstance(e, RayActorError):
        # ActorDiedError: "The actor died unexpectedly ...\n\tclass_name: X\n\tactor_id: ...\n\tpid: N ...";
        # ActorUnavailableError (killed mid-call or restarting): "The actor <id> is unavailable: ..." and no class/pid
        text = str(e).strip()
        cls, pid = re.search(r"class_name: (\S+)", text), re.search(r"\bpid: (\d+)", text)
        known = notes.get(ACTOR_NOTE) or (f"{cls.group(1) if cls else 'unknown class'}, pid {pid.group(1) if pid else '?'}")
        line = f"a Ray actor of the run died ({known}; Ray actor id {getattr(e, 'actor_id', None) or '?'}): {text.splitlines()[0]}"
    elif isinstance(e, OutOfMemoryError):  # "N worker(s) were killed due to the node running low on memory. ..."
        line = f"Ray's memory monitor killed processes of the run: {str(e).strip().splitlines()[0]}"
    else:
        return None
    phase = notes.get(PHASE_NOTE)
    return f"{line}; the run stopped in {phase}" if phase else line


def resume_hint(run_dir: str) -> str:
    """How to go on: resume from the last committed checkpoint, or start again when there is none."""
    from learner.learner import CheckpointError, latest_tag

    try:
        step = int(latest_tag(os.path.join(run_dir, "checkpoints")).removeprefix("step"))
    except CheckpointError:
        return "no checkpoint was written (set train.checkpoint_every); start the run again"
    return (f"continue from its last checkpoint (update {step}; later steps are redone) with: "
            f"python -m launch.train resume={run_dir}")


def on_sigint(signum, frame) -> None:
    """First Ctrl-C: finish the step, checkpoint, stop cleanly. Second: abort at once."""
    STOP.set()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print("\n[graftrl] Ctrl-C: checkpointing after this step (press again to abort)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.train", description="graftrl: RL post-training with prefix access")
    ap.add_argument("--config", default="configs/default.yaml", help="YAML config (differences from launch/config.py defaults)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10 store.scorer=random; "
                                                 "resume=runs/<id> continues a run from its last checkpoint")
    args = ap.parse_args(argv)
    try:
        resume_dir, overrides = parse_resume(args.overrides)
        if resume_dir:
            cfg = load_config(os.path.join(resume_dir, "config.yaml"), overrides)
            run_dir = resume_dir
        else:
            cfg = load_config(args.config, overrides)
            run_dir = new_run_dir(cfg)
        check_task(cfg.task, cfg.model)  # model, data file, verifier, tokenizer: fail before anything starts
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not resume_dir:
        os.makedirs(run_dir)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    log = lambda m: print(m, file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, on_sigint)
    try:
        summary = train(cfg, os.path.abspath(run_dir), log=log, resume=bool(resume_dir))
    except Exception as e:
        died = component_died(e)
        if died is None:
            log(f"[graftrl] run failed; partial outputs left in {run_dir} for inspection")
            raise
        print(f"error: {died}; every actor of the run was stopped; {resume_hint(run_dir)}", file=sys.stderr, flush=True)
        return 1
    except BaseException:
        log(f"[graftrl] run failed; partial outputs left in {run_dir} for inspection")
        raise
    write_summary(run_dir, cfg.run_dir, summary)
    print_summary(summary)
    log(f"[graftrl] summary: {os.path.join(run_dir, 'summary.json')}")
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
