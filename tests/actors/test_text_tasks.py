"""Text tasks on plain data: JSONL loading, arithmetic problems, TextTask with a locally trained tokenizer."""
import json
import logging
import random
import re

import pytest

from actors.data import DataError, Example, load_jsonl, parse_line
from actors.tasks import make_task
from actors.tasks.arithmetic import make_problems
from actors.tasks.text import TextTask

CHAT_TEMPLATE = "{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE tokenizer trained here (no downloads), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [e.prompt + "\n" + e.answer for e in make_problems(300, 3, 0)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<|user|>", "<|assistant|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ---- JSONL ---------------------------------------------------------------------
GOOD = [json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) for i in range(50)]
BAD = ["{not json", json.dumps(["a", "list"]), json.dumps({"answer": "3"}), json.dumps({"prompt": "x"}),
       json.dumps({"prompt": "", "answer": "1"})]


def test_parse_line_accepts_numbers_and_ids():
    ex = parse_line(json.dumps({"prompt": "2+2?", "answer": 4, "id": 7}))
    assert ex == Example(id="7", prompt="2+2?", answer="4")
    assert parse_line(json.dumps({"prompt": "2+2?", "answer": "4"})).id  # hash id when none is given


def test_jsonl_skip_reports_line_numbers(tmp_path, caplog):
    lines = GOOD[:3] + [BAD[0], ""] + GOOD[3:5] + BAD[1:]  # bad lines at 4, 8, 9, 10, 11; line 5 blank
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with caplog.at_level(logging.WARNING):
        examples = load_jsonl(path, "skip")
    assert [e.prompt for e in examples] == [json.loads(x)["prompt"] for x in GOOD[:5]]
    msg = caplog.text
    assert "5 malformed line(s)" in msg and "skipped" in msg
    assert re.findall(r"line (\d+):", msg) == ["4", "8", "9", "10", "11"]
    assert "not valid JSON" in msg and "expected a JSON object" in msg and "'prompt'" in msg and "'answer'" in msg


def test_jsonl_reject_raises_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD[:2] + [BAD[0]] + GOOD[2:3] + [BAD[2]])
    with pytest.raises(DataError, match=r"2 malformed line\(s\): line 3: not valid JSON.*; line 5: missing"):
        load_jsonl(path, "reject")


def test_jsonl_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="cannot read prompt file"):
        load_jsonl(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="no usable examples"):
        load_jsonl(write_jsonl(tmp_path / "bad.jsonl", BAD), "skip")


# ---- arithmetic problems ---------------------------------------------------------
def test_arithmetic_problems_are_consistent_and_distinct():
    problems = make_problems(500, steps=4, seed=0)
    assert len({p.prompt for p in problems}) == 500
    assert make_problems(500, steps=4, seed=0) == problems  # deterministic
    for p in problems:
        *work, final = p.answer.splitlines()
        assert len(work) == 4 and p.prompt.count(".") == 5  # start + 4 operations
        value = int(re.match(r"(\d+)", work[0]).group(1))
        for line in work:
            a, op, b, _, c = line.split()
            assert int(a) == value and int(c) == {"+": value + int(b), "-": value - int(b), "*": value * int(b),
                                                  "/": value // int(b)}[op] >= 0
            assert op != "/" or value % int(b) == 0
            value = int(c)
        assert final == f"#### {value}"


# ---- TextTask --------------------------------------------------------------------
def test_train_and_heldout_are_disjoint(tokenizer):
    task = TextTask(make_problems(1000, 3, 0), tokenizer, heldout_size=50)
    held = {e.prompt for e in task.heldout_prompts()}
    train = {e.prompt for e in task.train_prompts(random.Random(0), 2000)}
    assert len(held) == 50 and train and not held & train


def test_separate_heldout_file_is_removed_from_training(tokenizer):
    examples = make_problems(100, 3, 0)
    task = TextTask(examples, tokenizer, heldout_examples=examples[:10])
    assert {e.prompt for e in task.heldout_prompts()} == {e.prompt for e in examples[:10]}
    assert not {e.prompt for e in task.train_examples} & {e.prompt for e in examples[:10]}


def test_prompt_ids_use_chat_template_and_reward_decodes(tokenizer):
    task = TextTask(make_problems(200, 3, 0), tokenizer, verifier="gsm8k")
    ex = task.heldout_prompts()[0]
    ids = task.prompt_ids(ex)
    assert tokenizer.decode(ids) == f"<|user|>{ex.prompt}\n<|assistant|>"
    right = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
    assert task.reward(ids, right) == 1.0
    assert task.reward(ids, task.answer_ids(ex)) == 1.0  # trailing EOS is skipped when decoding
    wrong = tokenizer(ex.answer.rsplit("#### ", 1)[0] + "#### 100000", add_special_tokens=False)["input_ids"]
    assert task.reward(ids, wrong) == 0.0
    assert task.reward(ids, []) == 0.0  # malformed: nothing generated
    assert task.verifier_errors == 0
    plain = TextTask(make_problems(200, 3, 0), tokenizer, chat_template=False)
    assert tokenizer.decode(plain.prompt_ids(ex)) == ex.prompt


def _raising_verifier(completion, answer):
    if "boom" in completion:
        raise RuntimeError("verifier exploded")
    return 1.0


def test_raising_verifier_scores_zero_counts_and_logs(tokenizer, caplog):
    task = TextTask(make_problems(200, 3, 0), tokenizer, verifier=f"{__name__}:_raising_verifier")
    ex = task.train_examples[0]
    ids = task.prompt_ids(ex)
    boom = tokenizer("boom", add_special_tokens=False)["input_ids"]
    with caplog.at_level(logging.WARNING):
        rewards = [task.reward(ids, boom), task.reward(ids, [5, 6]), task.reward(ids, boom)]
    assert rewards == [0.0, 1.0, 0.0]
    assert task.verifier_errors == 2 and "verifier exploded" in caplog.text
    assert task.pop_verifier_errors() == 2 and task.pop_verifier_errors() == 0
    assert task.reward([1, 2, 3], boom) == 0.0  # a prompt the task does not know: scored 0 and counted
    assert task.verifier_errors == 3 and task.pop_verifier_errors() == 1
    assert task.reward(ids, [-5]) == 0.0  # ids the tokenizer cannot decode: scored 0 and counted
    assert task.pop_verifier_errors() == 1


def test_make_task_from_config(tokenizer, tmp_path):
    from omegaconf import OmegaConf

    from launch.config import TaskConfig

    cfg = OmegaConf.structured(TaskConfig(name="arithmetic", horizon=2, num_examples=300, heldout_size=20))
    task = make_task(cfg, tokenizer=tokenizer)
    assert task.verifier_name == "numeric" and len(task.heldout_prompts()) == 20
    assert all(e.answer.count("\n") == 2 for e in task.train_examples)
    path = write_jsonl(tmp_path / "d.jsonl", GOOD + [BAD[0]])
    cfg = OmegaConf.structured(TaskConfig(name="jsonl", data_path=path, verifier="gsm8k", on_bad_line="skip"))
    task = make_task(cfg, tokenizer=tokenizer)
    assert task.verifier_name == "gsm8k" and len(task.train_examples) + len(task.heldout_prompts()) == len(GOOD)
    with pytest.raises(DataError, match="line 51"):
        make_task(OmegaConf.merge(cfg, {"on_bad_line": "reject"}), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs the policy's tokenizer"):
        make_task(cfg)


def test_model_folder_tokenizer_and_early_config_errors(tokenizer, tmp_path):
    """A Hugging Face folder's tokenizer (with its chat template) is loaded from disk; bad data fails before startup."""
    from launch.base_model import ensure_base_model
    from launch.config import ConfigError, load_config

    folder = tmp_path / "policy"
    tokenizer.save_pretrained(folder)
    task = make_task(load_config(None, ["task.name=arithmetic", "task.num_examples=200"]).task, tokenizer_dir=str(folder))
    ex = task.heldout_prompts()[0]
    assert task.use_chat_template and tokenizer.decode(task.prompt_ids(ex)).startswith("<|user|>")
    data = write_jsonl(tmp_path / "d.jsonl", GOOD + [BAD[0]])
    ok = load_config(None, ["task.name=jsonl", f"task.data_path={data}", f"model.path={folder}"])
    assert ensure_base_model(ok.model, ok.task) == str(folder)
    for overrides, match in [(["task.on_bad_line=reject"], "task .*line 51: not valid JSON"),
                             (["task.verifier=nosuch.module:f"], "cannot import module 'nosuch.module'"),
                             ([f"task.data_path={tmp_path}/missing.jsonl"], "cannot read prompt file")]:
        cfg = load_config(None, ["task.name=jsonl", f"task.data_path={data}", f"model.path={folder}", *overrides])
        with pytest.raises(ConfigError, match=match):
            ensure_base_model(cfg.model, cfg.task)


def test_shipped_task_configs_load(tmp_path):
    from launch.config import load_config

    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    cfg = load_config("configs/arithmetic.yaml", [f"model.path={tmp_path}"])
    assert (cfg.task.name, cfg.task.verifier) == ("arithmetic", "numeric")
    cfg = load_config("configs/gsm8k_jsonl.yaml", [f"task.data_path={data}", f"model.path={tmp_path}"])
    assert (cfg.task.name, cfg.task.verifier, cfg.task.on_bad_line) == ("jsonl", "gsm8k", "skip")
    default = load_config("configs/default.yaml")
    assert default.task.name == "chain" and default.model.path is None  # the main job: chain task, built base model
