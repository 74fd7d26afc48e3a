"""Tiny real models, tokenizers and adapters, built locally.

Used by the demo, the tests and the benchmarks: nothing here downloads anything. Models are real
``transformers`` architectures with random weights; adapters are real PEFT adapters with random
(non-zero) LoRA weights, saved the way a training run saves them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_tokenizer(folder: Path | str, vocab_size: int, extra_tokens: int = 0) -> Path:
    """A word-level tokenizer with ``vocab_size`` tokens (+ ``extra_tokens`` added special ones),
    special tokens and a chat template, saved with ``save_pretrained``."""
    folder = Path(folder)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    if extra_tokens:
        fast.add_special_tokens(
            {"additional_special_tokens": [f"<|extra_{i}|>" for i in range(extra_tokens)]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


#: Split regexes of byte-level BPE pre-tokenizers (as Hugging Face tokenizer.json stores them).
BPE_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",  # Llama 3's
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
             r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
CHAT_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def _corpus() -> list[str]:
    text = ("the model merges a small adapter into its base and writes one file that llama "
            "runs quickly on every machine , with numbers 12 345 and 2024 ! hello world ? it is "
            "done . we've said they'll go")
    words = text.split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]


def save_bpe_tokenizer(folder: Path | str, vocab_size: int, pre: str = "gpt-2",
                       add_bos: bool = False) -> Path:
    """A real byte-level BPE tokenizer (trained here on a fixed text, offline) with ``<s>``,
    ``</s>``, ``<pad>``, chat special tokens and a chat template, saved with
    ``save_pretrained``. ``pre``: "gpt-2" (ByteLevel's own regex) or a :data:`BPE_SPLITS` key.
    ``add_bos``: encoding adds ``<s>`` first (a TemplateProcessing post-processor, as Llama 3's
    tokenizer.json adds ``<|begin_of_text|>``)."""
    from tokenizers import Regex, decoders, processors, trainers

    folder = Path(folder)
    tok = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(BPE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # Qwen2's tokenizer class (which transformers picks for a qwen2 config) adds <|endoftext|>
    # unless the vocabulary has it, as every real Qwen2 tokenizer does
    specials = ["<s>", "</s>", "<pad>", *CHAT_SPECIALS, *(["<|endoftext|>"] if pre == "qwen2" else [])]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    if add_bos:
        bos = ("<s>", tok.token_to_id("<s>"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[bos])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


#: SentencePiece tokenizers as the families ship them: special pieces with their ids, the
#: pieces the model holds as user-defined (Gemma's turn markers), whether SentencePiece adds a
#: leading space, transformers' tokenizer class, the chat tokens marked special in tokenizer.json
#: (Gemma's turn markers, Phi-3's <|user|> and the like, added after the model's pieces), and
#: how many ids are left after the pieces (transformers adds Gemma's <mask> there).
SENTENCEPIECE = {
    "gemma": {"ids": {"pad": (0, "<pad>"), "eos": (1, "<eos>"), "bos": (2, "<bos>"),
                      "unk": (3, "<unk>")},
              "pieces": ["<start_of_turn>", "<end_of_turn>"], "prefix_space": False,
              "class": "GemmaTokenizer", "added": ["<start_of_turn>", "<end_of_turn>"],
              "reserved": 1},
    "phi3": {"ids": {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"),
                     "pad": (-1, "<pad>")},
             "pieces": [], "prefix_space": True, "class": "LlamaTokenizer",
             "added": ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
             "reserved": 16},
}


def _train_sentencepiece(path: Path, vocab_size: int, kind: str) -> None:
    """Train a BPE SentencePiece model on :func:`_corpus` (offline, byte fallback, digits split,
    no normalization, as Gemma's and Llama's models are) and write it to ``path``."""
    import io

    import sentencepiece as spm

    spec = SENTENCEPIECE[kind]
    ids = {f"{role}_id": i for role, (i, _) in spec["ids"].items()}
    pieces = {f"{role}_piece": p for role, (_, p) in spec["ids"].items()}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=spec["prefix_space"], user_defined_symbols=spec["pieces"],
        allow_whitespace_only_pieces=True, minloglevel=2, num_threads=1, **ids, **pieces)
    path.write_bytes(model.getvalue())


def save_sentencepiece_tokenizer(folder: Path | str, vocab_size: int, kind: str = "gemma",
                                 chat_template: str = CHAT_TEMPLATE) -> Path:
    """A real SentencePiece tokenizer (``tokenizer.model``, trained here offline) and the
    transformers tokenizer converted from it (``tokenizer.json``, ``tokenizer_config.json``),
    as Gemma 2 ("gemma") and Phi-3 ("phi3") ship them.

    Gemma's model holds ``<start_of_turn>``/``<end_of_turn>`` as pieces; Phi-3's chat tokens are
    added after its pieces (the config's ``vocab_size`` is larger than the tokenizer, as
    Phi-3's 32064 rows over 32011 tokens). The added tokens are also listed in
    ``tokenizer_config.json``'s ``added_tokens_decoder``, as the published files list them (the
    place llama.cpp's converter reads them from for a SentencePiece vocabulary).
    """
    import tempfile

    from transformers import AutoTokenizer

    folder = Path(folder)
    spec = SENTENCEPIECE[kind]
    config = {"tokenizer_class": spec["class"], "add_bos_token": True, "add_eos_token": False}
    roles = {f"{role}_token": p for role, (i, p) in spec["ids"].items() if i >= 0}
    with tempfile.TemporaryDirectory() as scratch:  # the model alone: converted, not reloaded
        model = Path(scratch) / "tokenizer.model"
        _train_sentencepiece(model, vocab_size - spec["reserved"], kind)
        (Path(scratch) / "tokenizer_config.json").write_text(json.dumps(config))
        tokenizer = AutoTokenizer.from_pretrained(scratch, **roles, **config)
        if spec["added"]:
            tokenizer.add_special_tokens({"additional_special_tokens": spec["added"]})
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(folder)  # tokenizer.json and tokenizer_config.json
        (folder / "tokenizer.model").write_bytes(model.read_bytes())
    _list_added_tokens(folder)
    return folder


def _list_added_tokens(folder: Path) -> None:
    """Write tokenizer.json's added tokens into tokenizer_config.json's ``added_tokens_decoder``
    (transformers 5 no longer writes it there)."""
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                          "single_word", "special")} for t in added}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _small(**overrides) -> dict:
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    kw.update(overrides)
    return kw


def model_config(arch: str, **overrides):
    """A tiny config of one architecture: llama, qwen2 (biases), gemma (tied, norms stored
    w - 1), gpt2 (Conv1D), phi3 (fused)."""
    if arch == "llama":
        return LlamaConfig(**_small(**{"tie_word_embeddings": False, **overrides}))
    if arch == "qwen2":
        return Qwen2Config(**_small(**{"tie_word_embeddings": True, **overrides}))
    if arch == "gemma":
        return GemmaConfig(**_small(**{"head_dim": 16, "tie_word_embeddings": True, **overrides}))
    if arch == "phi3":
        return Phi3Config(**_small(tie_word_embeddings=False, pad_token_id=0, **overrides))
    if arch == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
        kw.update(overrides)
        return GPT2Config(**kw)
    if arch in MORE_ARCHS:
        return MORE_ARCHS[arch](**overrides)
    raise ValueError(f"unknown architecture {arch!r}")


def _mixtral(**overrides):
    from transformers import MixtralConfig

    return MixtralConfig(**_small(**{"intermediate_size": 96, "num_local_experts": 4,
                                     "num_experts_per_tok": 2, "tie_word_embeddings": False,
                                     **overrides}))


def _qwen3_moe(**overrides):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**_small(**{"moe_intermediate_size": 48, "num_experts": 4,
                                      "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                                      "mlp_only_layers": [], "tie_word_embeddings": False,
                                      **overrides}))


def _qwen2_moe(**overrides):
    """Qwen2-MoE: a router (``mlp.gate``, a bare weight), stacked experts, and a shared expert
    with its own gate (``nn.Linear`` modules)."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**_small(moe_intermediate_size=48, shared_expert_intermediate_size=96,
                                   num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                                   mlp_only_layers=[], tie_word_embeddings=False, **overrides))


def _gpt_neox(**overrides):
    from transformers import GPTNeoXConfig

    kw = _small(tie_word_embeddings=False)
    kw.pop("num_key_value_heads")
    kw.update(overrides)
    return GPTNeoXConfig(**kw)


def _llava(**overrides):
    from transformers import LlavaConfig

    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    return LlavaConfig(text_config=LlamaConfig(**_small(**overrides)).to_dict(),
                       vision_config=vision, image_token_index=127)


def _llama3(**overrides):
    """Llama 3.1's rope scaling (``rope_type: llama3``), on a tiny context."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    return LlamaConfig(**_small(**{"tie_word_embeddings": False, "rope_parameters": rope,
                                   **overrides}))


def _by_name(name: str, **fixed):
    """A config class of transformers by name, with :func:`_small`'s sizes."""
    def make(**overrides):
        import transformers

        return getattr(transformers, name)(**_small(**{**fixed, **overrides}))
    return make


MORE_ARCHS = {"llama3": _llama3, "mistral": _by_name("MistralConfig", tie_word_embeddings=False),
              "qwen3": _by_name("Qwen3Config", head_dim=16, tie_word_embeddings=True),
              "gemma2": _by_name("Gemma2Config", head_dim=16, tie_word_embeddings=True),
              "gemma3": _by_name("Gemma3TextConfig", head_dim=16, query_pre_attn_scalar=16,
                                   tie_word_embeddings=True),  # scaled as real Gemma 3s are
              "mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "qwen2_moe": _qwen2_moe,
              "gpt_neox": _gpt_neox, "llava": _llava}


def model_class_of(folder: Path | str):
    """The transformers class a saved model was built with (``architectures``)."""
    from transformers import AutoConfig

    from mergeflow.model.meta import model_class

    return model_class(AutoConfig.from_pretrained(folder))


def build_base(folder: Path | str, arch: str = "llama", *, dtype: torch.dtype = torch.float32,
               seed: int = 0, max_shard_size: str | None = None, tokenizer: bool = True,
               **overrides) -> Path:
    """Build and save a tiny random model (and its tokenizer) with ``save_pretrained``."""
    folder = Path(folder)
    torch.manual_seed(seed)
    config = model_config(arch, **overrides)
    if arch == "llava":
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if tokenizer:
        save_tokenizer(folder, config.get_text_config().vocab_size)
    return folder


def build_quantized_base(original: Path | str, folder: Path | str, *, bits: int = 4,
                         quant_type: str = "nf4", double_quant: bool = False,
                         compute_dtype: torch.dtype = torch.float32,
                         max_shard_size: str | None = None) -> Path:
    """Quantize a saved model with bitsandbytes, as ``from_pretrained(quantization_config=...)``
    does, and save the quantized checkpoint (tokenizer files copied along).

    Args:
        original: a full-precision model folder (e.g. from :func:`build_base`); hidden sizes
            must be multiples of 64 for bitsandbytes' CPU 4-bit forward pass.
        folder: where to save the quantized model.
        bits: 4 (``load_in_4bit``) or 8 (``load_in_8bit``, LLM.int8).
        quant_type, double_quant, compute_dtype: the ``bnb_4bit_*`` settings (4-bit only).
        max_shard_size: shard the quantized save (e.g. "100KB").
    """
    from transformers import BitsAndBytesConfig

    original, folder = Path(original), Path(folder)
    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                    bnb_4bit_use_double_quant=double_quant,
                                    bnb_4bit_compute_dtype=compute_dtype)
    elif bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    model = AutoModelForCausalLM.from_pretrained(original, quantization_config=config,
                                                 device_map="cpu")
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    for path in original.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


def _randomize_trained_parts(peft_model, seed: int) -> None:
    """Give every trainable tensor a non-trivial value, as a training run would."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * noise.to(param.dtype))
            elif "lora_" in name:
                continue  # init_lora_weights=False already made A and B random
            else:
                param.add_(0.05 * noise.to(param.dtype))
        for name, param in peft_model.named_parameters():
            if name.endswith("lora_B.default.bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def build_adapter(base: Path | str, folder: Path | str, *, seed: int = 0,
                  save_tokenizer_too: bool = False, **lora_kwargs) -> Path:
    """Train-free adapter: PEFT's ``get_peft_model`` with random LoRA weights, saved by PEFT.

    ``lora_kwargs`` go to ``LoraConfig`` (``init_lora_weights`` defaults to False so B != 0).
    """
    from peft import LoraConfig, get_peft_model

    folder = Path(folder)
    torch.manual_seed(seed)
    model = model_class_of(base).from_pretrained(base)
    lora_kwargs.setdefault("init_lora_weights", False)
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    _randomize_trained_parts(peft_model, seed)
    peft_model.save_pretrained(folder)
    if save_tokenizer_too:
        for name in Path(base).iterdir():
            if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                (folder / name.name).write_bytes(name.read_bytes())
    return folder


def _block_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight in DeepSeek's block-wise FP8: float8_e4m3fn values and a float32 scale per
    ``block`` (``max|w| / 448``; the ``weight_scale_inv`` that decoding multiplies by)."""
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = weight.float()
    blocks = padded.reshape(grid[0], block[0], grid[1], block[1])
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)  # (R, C)
    values = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
    return values.to(torch.float8_e4m3fn), scale


def build_fp8_base(original: Path | str, folder: Path | str, *, layout: str = "block") -> Path:
    """An FP8 checkpoint of a saved 16-bit model, as FP8 bases ship (tokenizer files copied).

    ``layout="block"``: ``quant_method: fp8`` with a ``weight_scale_inv`` per 128x128 block of
    every Linear weight in the layers (DeepSeek's and Qwen's layout, transformers'
    FineGrainedFP8Config). ``layout="channel"``: compressed-tensors FP8_DYNAMIC made by
    compressed-tensors' own compressor (llm-compressor's output format).
    """
    import json

    from safetensors.torch import load_file, save_file

    original, folder = Path(original), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "channel":
        _compressed_tensors_fp8(original, folder)
    else:
        tensors = {}
        for name, tensor in load_file(original / "model.safetensors").items():
            if tensor.ndim == 2 and ".layers." in name and name.endswith("proj.weight"):
                tensors[name], tensors[f"{name}_scale_inv"] = _block_fp8(tensor, (128, 128))
            else:
                tensors[name] = tensor
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((original / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    for path in original.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation")):
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


def _compressed_tensors_fp8(original: Path, folder: Path, scheme: str = "FP8_DYNAMIC") -> None:
    """compressed-tensors' own FP8 of a saved model, as llm-compressor's data-free oneshot writes
    it: the scheme applied to every Linear but lm_head, weight scales from each weight's min/max
    (compressed-tensors' ``calculate_qparams``), compressed and saved with its config."""
    save_compressed_tensors(AutoModelForCausalLM.from_pretrained(original), folder, scheme)


def save_compressed_tensors(model, folder: Path | str, scheme: str = "FP8_DYNAMIC") -> None:
    """Quantize ``model`` in place with compressed-tensors' preset ``scheme`` (Linear, lm_head
    ignored), weight scales from the weights' own ranges, and save it compressed."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    preset = preset_name_to_scheme(scheme, ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": preset},
                                                        ignore=["lm_head"]))
    for module in model.modules():
        if not hasattr(module, "weight_scale"):
            continue
        weight = module.weight.data
        if preset.weights.strategy == "block":
            bh, bw = preset.weights.block_structure
            rows, cols = weight.shape
            padded = torch.zeros(-(-rows // bh) * bh, -(-cols // bw) * bw, dtype=weight.dtype)
            padded[:rows, :cols] = weight
            blocks = padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)
            low, high = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
        else:
            low, high = torch.aminmax(weight, dim=1, keepdim=True)
        scale, zero = calculate_qparams(low, high, preset.weights)
        module.weight_scale.data = scale
        module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(str(folder))


def build_mxfp4_base(original: Path | str, folder: Path | str) -> Path:
    """gpt-oss's MXFP4 checkpoint of a saved 16-bit GptOss: each expert tensor ``X`` (E, in, out)
    stored as ``X_blocks`` (E, out, in/32, 16), 32 e2m1 values per group (low nibble first), and
    ``X_scales`` (E, out, in/32), one e8m0 exponent per group, as openai/gpt-oss ships it
    (``quant_method: mxfp4``; attention, router, embeddings and head unquantized). Values round
    to the nearest e2m1 of ``x / 2**e``, with ``e`` the smallest exponent that fits the group."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import FP4_VALUES

    original, folder = Path(original), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    codes = torch.tensor(FP4_VALUES)
    tensors = {}
    for name, tensor in load_file(original / "model.safetensors").items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = tensor
            continue
        stored = tensor.float().transpose(1, 2)  # (E, in, out) -> (E, out, in)
        groups = stored.reshape(*stored.shape[:2], -1, 32)  # (E, out, G, 32)
        exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0))
        scaled = groups / torch.exp2(exponent)[..., None]
        index = (scaled[..., None] - codes).abs().argmin(-1).to(torch.uint8)  # (E, out, G, 32)
        tensors[f"{name}_blocks"] = (index[..., 0::2] | (index[..., 1::2] << 4)).contiguous()
        tensors[f"{name}_scales"] = (exponent + 127).to(torch.uint8).contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((original / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for path in original.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation")):
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


def build_gpt_oss(folder: Path | str, max_shard_size: str | None = None, hidden: int = 64,
                  intermediate: int = 48, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny GptOss (4 experts, gate/up interleaved in ``gate_up_proj`` (E, hidden, 2I)) saved
    by ``save_pretrained``, with its tokenizer: its experts are stored fused, as in memory, and
    random (not the zero/small init)."""
    from transformers import GptOssConfig

    config = GptOssConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=64, sliding_window=16,
                          layer_types=["sliding_attention", "full_attention"],
                          tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.normal_(0, 0.05)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    save_tokenizer(folder, config.vocab_size)
    return Path(folder)
