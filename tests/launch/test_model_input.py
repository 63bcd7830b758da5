"""Bad model and task input for the real-model path: one line naming the problem, exit 2, nothing under runs/.

In-process through load_config + check_task (what `launch.train` runs before it makes the run folder), and the
same inputs through the CLI.
"""
import json
import shutil
import subprocess
import sys

import pytest

from launch.base_model import check_task
from launch.config import ConfigError, load_config
from launch.models import gguf_path

from tests.conftest import ROOT
from tests.launch.smollm2 import smollm2_dir  # noqa: F401 - fixture

RG = ["task.name=reasoning_gym", "model.name=smollm2"]


def bad_inputs(tmp_path, model_dir):
    """(name, overrides, words of the one-line error)."""
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    shutil.copy(f"{model_dir}/config.json", no_tok)
    small = tmp_path / "small_vocab"
    small.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(f"{model_dir}/{f}", small)
    cfg = json.load(open(f"{model_dir}/config.json"))
    json.dump({**cfg, "vocab_size": 1000}, open(small / "config.json", "w"))
    gguf_dir = tmp_path / "gguf_only"
    gguf_dir.mkdir()
    (gguf_dir / "model.Q4_0.gguf").write_bytes(b"GGUF")
    words = tmp_path / "words.jsonl"
    words.write_text("".join(json.dumps({"prompt": f"Spell {w} backwards.", "answer": w[::-1]}) + "\n"
                             for w in ("apple", "pear", "plum", "fig", "kiwi", "lime", "date", "yuzu", "sloe", "quince")))
    return [
        ("no_tokenizer", ["task.name=arithmetic", f"model.path={no_tok}"], "has no tokenizer"),
        ("gguf_file", ["task.name=arithmetic", f"model.path={gguf_path('smollm2')}"], "is a GGUF file, not a Hugging Face folder; use model.name=smollm2"),
        ("gguf_folder", ["task.name=arithmetic", f"model.path={gguf_dir}"], "holds a GGUF file (model.Q4_0.gguf) but no Hugging Face config.json; use model.name=smollm2"),
        ("vocab", ["task.name=arithmetic", f"model.path={small}"], "tokenizer has 49152 tokens but config.json's vocab_size is 1000"),
        ("jsonl_no_numbers", ["task.name=jsonl", f"task.data_path={words}", "model.name=smollm2"],
         "none of the 10 answers holds a number the 'numeric' verifier can compare"),
        ("generator_no_numbers", [*RG, "task.generator=spell_backward", "task.num_examples=200"], "only 0 of the 200 answers hold a number"),
        ("unknown_generator", [*RG, "task.generator=chain_summ"], "task.generator='chain_summ' is not a reasoning_gym dataset; e.g. chain_sum"),
        ("bad_options", [*RG, "task.generator=chain_sum", "task.generator_options.min_term=3"], "rejected task.generator_options={'min_term': 3}"),
        ("no_generator", RG, "task.name=reasoning_gym needs task.generator"),
        ("unknown_model", ["task.name=arithmetic", "model.name=gpt5"], "model.name='gpt5' is not valid; choose one of smollm2"),
        ("chain_on_smollm2", ["model.name=smollm2"], "task.name=chain speaks the tiny base model's own 15-token vocabulary"),
        ("no_model", ["task.name=reasoning_gym", "task.generator=chain_sum"], "needs model.path (a Hugging Face model folder with a tokenizer) or model.name=smollm2"),
    ]


def test_bad_model_and_task_input_in_process(tmp_path, smollm2_dir):
    for name, overrides, words in bad_inputs(tmp_path, smollm2_dir):
        with pytest.raises(ConfigError) as e:
            cfg = load_config(None, overrides)
            check_task(cfg.task, cfg.model.path)
        msg = str(e.value)
        assert words in msg and "\n" not in msg, (name, msg)


def test_bad_model_and_task_input_cli(tmp_path, smollm2_dir):
    for name, overrides, words in bad_inputs(tmp_path, smollm2_dir):
        runs = tmp_path / f"runs_{name}"
        p = subprocess.run([sys.executable, "-m", "launch.train", "--config", "configs/smoke.yaml", *overrides,
                            f"run_dir={runs}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (name, p.stderr)
        assert not runs.exists(), name


def test_good_real_model_configs_pass_the_checks(smollm2_dir):
    for path in ("configs/smollm2_chain_sum.yaml", "configs/smollm2_gsm.yaml"):
        cfg = load_config(path)
        check_task(cfg.task, cfg.model.path)  # finds model.name through the whole config
        check_task(cfg.task, cfg.model)
        assert cfg.model.name == "smollm2" and cfg.store.step_delimiter == 198 and cfg.train.prompts_per_step == 8
    cfg = load_config("configs/smollm2_chain_sum.yaml", [f"model.path={smollm2_dir}"])  # path overrides name
    check_task(cfg.task, cfg.model.path)
