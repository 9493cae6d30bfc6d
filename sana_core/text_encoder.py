"""Gemma-2 text encoding for SANA: the complex human instruction (CHI) recipe, loaded offline.

The caption is the last hidden state of Gemma-2 (after its final RMSNorm), computed by
transformers' own `Gemma2Model` with eager attention (Gemma-2's logit soft-capping has no
SDPA path; diffusers runs it eagerly too). The recipe, as in diffusers' `SanaPipeline` and
the official NVlabs/Sana code:

    text      = "\\n".join(CHI lines) + prompt            # the prompt stripped, optionally lowercased
    max_len   = len(tokens(CHI text, with <bos>)) + 300 - 2
    tokens    = tokenizer(text, padding="max_length", max_length=max_len, truncation=True)  # right padding
    embedding = gemma(tokens).last_hidden_state[:, [0] + range(-299, 0)]   # <bos> + last 299: (B, 300, D)

Without an instruction (negative prompts), and for an empty prompt, the prompt alone is padded to 300 tokens.

Files: a Hugging Face folder of gemma-2-2b-it (config.json, safetensors, tokenizer.json
and/or tokenizer.model; a diffusers pipeline folder's text_encoder/ + tokenizer/ works too),
or a ComfyUI-style single .safetensors: `Gemma2ForCausalLM` tensor names without `lm_head`
plus the SentencePiece model as a uint8 tensor `spiece_model`.
"""
import inspect
import json
import logging
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoints import (CheckpointError, default_device, default_dtype, describe, guess_component, load_weights,
                          read_checkpoint)

log = logging.getLogger(__name__)

MAX_TOKENS = 300  # caption length the SANA DiT was trained with

_CHI_BODY = (
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)
_CHI_FIRST = ("Given a user prompt, generate an {q}Enhanced prompt{q} that provides detailed visual descriptions "
              "suitable for image generation. Evaluate the level of detail in the user prompt:")
# The two CHI texts in the wild differ only in the quotes around "Enhanced prompt": the official
# NVlabs/Sana configs (what SANA was trained and is served with) use double quotes, diffusers'
# SanaPipeline single quotes.
INSTRUCTIONS = {
    "sana-official": (_CHI_FIRST.format(q='"'),) + _CHI_BODY,
    "sana-diffusers": (_CHI_FIRST.format(q="'"),) + _CHI_BODY,
}
DEFAULT_INSTRUCTION = "sana-official"

BASE_MODEL_NOTE = (
    "SANA was trained with gemma-2-2b-it (the instruction-tuned Gemma-2-2B). The gemma_2_2b file of "
    "ComfyUI's Lumina 2 is, as far as we know, the base gemma-2-2b: it loads and runs, but it conditions "
    "differently, so images will not match the reference and may follow the prompt less well.")

# google/gemma-2-2b(-it) config.json; a single file with hidden size 2304 and no config in its
# metadata is taken to have this geometry (layer count and vocabulary are read from the tensors).
GEMMA2_2B_CONFIG = {
    "model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": False,
    "attention_dropout": 0.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "vocab_size": 256000,
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class TextEncoder:
    """Gemma-2 plus its tokenizer; `encode` turns prompts into SANA captions.

    The token-embedding table (1.10 GiB of Gemma-2-2B's 4.87 in bf16) stays on the CPU: looking up a
    few hundred ids needs no GPU, and the layers get the looked-up vectors (`inputs_embeds`, scaled
    inside Gemma as usual). `on_device` is the rest, what moves to the GPU (and what a memory manager
    moves). `layers` is the part a Runtime replays as a CUDA graph (Runtime.encode_text)."""

    def __init__(self, model, tokenizer):
        self.model = model          # transformers Gemma2Model, eval mode, no grad
        self.tokenizer = tokenizer  # Gemma tokenizer: <bos> added, right padding
        self.hidden_size = model.config.hidden_size
        self.on_device = torch.nn.ModuleList(m for name, m in model.named_children() if name != "embed_tokens")
        # transformers 5.24 renamed Gemma's `past_key_values` argument `cache`
        self._cache_arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        """Where the layers compute (the embedding table may be elsewhere)."""
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def to(self, device) -> "TextEncoder":
        """Move the layers to `device`; the embedding table goes to the CPU (or stays there)."""
        self.model.embed_tokens.to("cpu")
        self.on_device.to(device)
        return self

    def offload(self) -> "TextEncoder":
        """Move the weights to the CPU (frees ~4 GB of GPU memory for sampling)."""
        return self.to("cpu")

    def layers(self, embeds: torch.Tensor, mask: torch.Tensor, keys=(), values=()) -> torch.Tensor:
        """Gemma's layers and final norm: (B, L, D) embeddings, (B, L) mask -> last hidden state.

        keys/values: per layer, the (1, kv heads, P, head dim) keys (after RoPE) and values of P tokens before
        these (an InstructionPrefix's): the L tokens sit at positions P..P+L-1 and attend to them all.
        The additive (B, 1, L, P + L) mask transformers would build (causal, padded keys at the dtype's minimum)
        is built here, on the device: transformers' own copies a scalar from the host, which a CUDA graph
        cannot capture. Beyond the sliding window (4096 tokens) transformers builds it (no prefix there)."""
        return self._layers(embeds, mask, _PrefixKV(keys, values) if keys else None)

    def _layers(self, embeds, mask, kv=None):
        L, window = mask.shape[1], self.model.config.sliding_window
        if kv is None:  # no prefix
            mask = _additive_mask(mask, 0, embeds.dtype) if L <= window else mask
            return self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        P = kv.get_seq_length()
        if P + L > window:
            raise ValueError(f"an instruction prefix needs its {P} + {L} tokens within Gemma's sliding window "
                             f"({window})")
        mask = _additive_mask(mask, P, embeds.dtype)  # every layer's (the window is wider than P + L)
        positions = torch.arange(P, P + L, device=embeds.device)[None]  # (1, L): RoPE continues after the prefix
        return self.model(inputs_embeds=embeds, attention_mask={"full_attention": mask, "sliding_attention": mask},
                          position_ids=positions, use_cache=False, **{self._cache_arg: kv}).last_hidden_state

    @torch.no_grad()
    def instruction_prefix(self, chi: str) -> "InstructionPrefix":
        """Gemma's keys and values for the tokens of the instruction `chi` (all but its last one, so that the
        caption's 299 kept positions always come from the prompt's own call) and its <bos> output."""
        ids = torch.tensor(self.tokenizer.encode(chi)[:-1])  # (P,): <bos> + instruction
        embeds = self.model.embed_tokens(ids[None].to(self.model.embed_tokens.weight.device)).to(self.device)
        record = _PrefixKV()  # keeps what each layer computes
        hidden = self._layers(embeds, torch.ones(ids[None].shape, dtype=torch.long, device=self.device), record)
        return InstructionPrefix(ids, tuple(record.keys), tuple(record.values), hidden[:, :1])

    @torch.no_grad()
    def encode(self, prompts, *, instruction=True, lowercase=False, layers=None, prefix=None,
               check=True) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions of `prompts` (a string or a list): (embeddings (B, 300, D), mask (B, 300): 1 real, 0 pad).

        `instruction`: True for the default CHI (`DEFAULT_INSTRUCTION`), False for none (negative
        prompts), a name in `INSTRUCTIONS`, or any other text used as the instruction itself.
        Prompts are stripped; `lowercase=True` also lowercases them, as diffusers does by default.
        `layers`: what runs self.layers (a Runtime passes a CUDA-graphed one); None: self.layers.
        An empty prompt is encoded as SANA encodes negatives, whatever `instruction` says: "" alone,
        padded to 300 tokens (diffusers' negative_prompt="").
        `prefix`: this instruction's InstructionPrefix (a Runtime caches it): Gemma then runs only the tokens
        after the longest token prefix every text shares with it (tokens can merge across the boundary
        between instruction and prompt); the result is the same.
        `check`: raise not_finite_error when the result holds NaN/inf (a wait for the GPU); False leaves the
        check to the caller (SanaPipeline reads it once sampling is queued).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prompts = [p.lower().strip() if lowercase else p.strip() for p in prompts]
        chi = instruction_text(instruction)
        if chi and "" in prompts:
            empty = [i for i, p in enumerate(prompts) if not p]
            if len(empty) == len(prompts):
                return self.encode(prompts, instruction=False, layers=layers, check=check)
            texts = [p for p in prompts if p]  # one call for the prompts, one for the empty ones (no instruction)
            emb, mask = self.encode(texts, instruction=instruction, layers=layers, prefix=prefix, check=check)
            none_emb, none_mask = self.encode([""] * len(empty), instruction=False, layers=layers, check=check)
            order = [i for i, p in enumerate(prompts) if p] + empty  # rows of cat(...) -> their prompt's place
            where = torch.tensor(order).argsort().to(emb.device)
            return torch.cat([emb, none_emb])[where], torch.cat([mask, none_mask])[where]
        if chi:
            texts = [chi + p for p in prompts]
            max_length = len(self.tokenizer.encode(chi)) + MAX_TOKENS - 2  # leaves 298 tokens for the prompt
        else:
            texts, max_length = prompts, MAX_TOKENS  # <bos> + 299
        for i, n in enumerate(len(ids) for ids in self.tokenizer(texts).input_ids):
            if n > max_length:
                log.warning(f"prompt {i} is too long: its last {n - max_length} tokens were dropped "
                            f"(at most {MAX_TOKENS - 2 if chi else MAX_TOKENS - 1} prompt tokens fit)")
        self.tokenizer.padding_side = "right"
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        ids, mask = tokens.input_ids, tokens.attention_mask  # (B, L) on the CPU
        start = max_length - MAX_TOKENS + 1 if chi else 1  # the caption: <bos> + tokens start.. (the last 299)
        caption_mask = torch.cat([mask[:, :1], mask[:, start:]], 1).to(self.device)  # (B, 300)
        P, keys, values = 0, (), ()
        if chi and prefix is not None and max_length <= self.model.config.sliding_window:
            shared = (ids[:, :len(prefix.ids)] == prefix.ids).all(0)  # (len(prefix.ids) <= start,) for the batch
            P = int(shared.cumprod(0).sum())  # the longest token prefix every text shares with the instruction
            keys, values = tuple(k[:, :, :P] for k in prefix.keys), tuple(v[:, :, :P] for v in prefix.values)
        table, device = self.model.embed_tokens, self.device
        distinct, where = torch.unique(ids[:, P:], return_inverse=True)  # most ids are padding: look each up once
        embeds = table(distinct.to(table.weight.device)).to(device)[where.to(device)]  # (B, L - P, D)
        hidden = (layers or self.layers)(embeds, mask[:, P:].to(device), keys, values)  # (B, L - P, D)
        if chi:  # slices, not an index list: no host-made index tensor to copy to the device
            bos = prefix.bos.expand(len(ids), -1, -1) if P else hidden[:, :1]  # P <= start: see instruction_prefix
            hidden = torch.cat([bos, hidden[:, start - P:]], 1)  # (B, 300, D)
        if check and not torch.isfinite(hidden).all():
            raise not_finite_error(self.dtype)
        return hidden, caption_mask


def not_finite_error(dtype) -> FloatingPointError:
    """The error for a caption holding NaN/inf (Gemma-2 overflows float16)."""
    return FloatingPointError(f"Gemma-2 produced NaN/inf in {dtype}; Gemma-2 overflows float16: load the text "
                              f"encoder in bfloat16 or float32")


def _additive_mask(mask: torch.Tensor, P: int, dtype) -> torch.Tensor:
    """(B, L) key mask (1 real, 0 pad) of L tokens after P unpadded ones -> the additive (B, 1, L, P + L) mask
    transformers would build: causal, padded keys at the dtype's minimum; made on the device."""
    L = mask.shape[1]
    causal = torch.ones(L, P + L, dtype=torch.bool, device=mask.device).tril_(P)  # (L, P + L)
    keys = torch.nn.functional.pad(mask.bool(), (P, 0), value=True)  # (B, P + L)
    allowed = causal & keys[:, None, None, :]  # (B, 1, L, P + L)
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill_(~allowed, torch.finfo(dtype).min)


class InstructionPrefix(NamedTuple):
    """What Gemma computes for an instruction's first tokens, reused by every prompt after it (Gemma is causal).
    A Runtime caches it per text encoder (Runtime.encode_text); TextEncoder.instruction_prefix makes it."""
    ids: torch.Tensor  # (P,) token ids on the CPU: <bos> + the instruction's tokens but its last
    keys: tuple  # per layer (1, kv heads, P, head dim), after RoPE, on the layers' device
    values: tuple  # per layer (1, kv heads, P, head dim)
    bos: torch.Tensor  # (1, 1, D): the last hidden state at <bos>, the caption's first token


class _PrefixKV:
    """What transformers' attention layers call as their cache (`update`): each layer's keys and values of the
    P tokens before this call, in front of its own. Given none, it records what each layer computes."""

    def __init__(self, keys=(), values=()):
        self.keys, self.values, self.record = list(keys), list(values), not keys

    def get_seq_length(self, *args) -> int:  # P (transformers before 5 asks for it)
        return 0 if self.record else self.keys[0].shape[2]

    def update(self, key, value, layer_idx, *args, **kwargs):  # key, value: (B, kv heads, L, head dim)
        if self.record:
            self.keys.append(key)
            self.values.append(value)
            return key, value
        B = key.shape[0]
        return (torch.cat([self.keys[layer_idx].expand(B, -1, -1, -1), key], 2),
                torch.cat([self.values[layer_idx].expand(B, -1, -1, -1), value], 2))


def instruction_text(instruction) -> str:
    """The text prepended to prompts: '' for none, a preset's lines joined by newlines, or custom text."""
    if instruction is True:
        instruction = DEFAULT_INSTRUCTION
    if not instruction:  # False, None, ""
        return ""
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be True, False, a preset name ({', '.join(INSTRUCTIONS)}) or text, "
                        f"not {type(instruction).__name__}")
    return "\n".join(INSTRUCTIONS[instruction]) if instruction in INSTRUCTIONS else instruction


def load_text_encoder(path, *, dtype=None, device=None) -> TextEncoder:
    """Gemma-2 and its tokenizer from a Hugging Face folder or a ComfyUI single file, offline.

    Defaults: the GPU if there is one, bfloat16 there (float32 where bf16 is missing: Gemma-2
    overflows float16), float32 on the CPU. Weights stream from the file to the device one tensor
    at a time."""
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = default_dtype(device)
        dtype = torch.float32 if dtype == torch.float16 else dtype
    path = Path(path)
    if path.is_dir() and (path / "text_encoder").is_dir():  # a diffusers pipeline folder
        path = path / "text_encoder"
    tensors, metadata = read_checkpoint(path, weight_names=("model",), dtype=dtype)
    spiece = tensors.pop("spiece_model", None)
    tensors = _gemma_tensors(path, tensors)
    config = _gemma_config(path, tensors, metadata)
    tokenizer = _load_tokenizer(path, spiece)
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(f"{path.name}: the tokenizer has {len(tokenizer)} tokens but the model only "
                              f"{config.vocab_size} embeddings: tokenizer and weights do not belong together")
    return TextEncoder(_build_model(config, tensors, device=device, dtype=dtype), tokenizer)


def _gemma_tensors(path: Path, tensors: dict) -> dict:
    """The Gemma2Model state dict: `model.` prefix and the (tied) `lm_head` removed."""
    tensors = {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}
    if guess_component(tensors) != "text_encoder":
        raise CheckpointError(f"{path.name} is not a Gemma-2 text encoder: it holds {describe(tensors)}. "
                              f"Give the text encoder gemma-2-2b-it as a Hugging Face folder or a single "
                              f".safetensors (e.g. models/text_encoders/gemma_2_2b*.safetensors)",
                              found=guess_component(tensors))
    tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    if "embed_tokens.weight" not in tensors or "layers.0.pre_feedforward_layernorm.weight" not in tensors \
            or "layers.0.self_attn.q_norm.weight" in tensors:
        raise CheckpointError(f"{path.name} holds a language model that is not Gemma-2 ({describe(tensors)}); "
                              f"SANA needs gemma-2-2b-it")
    return tensors


def _gemma_config(path: Path, tensors: dict, metadata: dict):
    """Gemma2Config from config.json (folder), the safetensors metadata "config", or, for hidden
    size 2304, the Gemma-2-2B geometry with layers and vocabulary counted from the tensors."""
    from transformers import Gemma2Config

    config = metadata.get("config")
    if isinstance(config, str):
        config = json.loads(config)
    vocab, hidden = tensors["embed_tokens.weight"].shape
    if config is None:
        if hidden != GEMMA2_2B_CONFIG["hidden_size"]:
            raise CheckpointError(f"{path.name}: a Gemma-2 of hidden size {hidden} (not the 2304 of Gemma-2-2B) needs "
                                  f"its config.json: use the Hugging Face folder, or store the config as JSON under "
                                  f"\"config\" in the safetensors metadata")
        layers = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("layers."))
        config = dict(GEMMA2_2B_CONFIG, num_hidden_layers=layers, vocab_size=vocab)
    if config.get("model_type") != "gemma2":
        raise CheckpointError(f"{path.name}: the config describes a {config.get('model_type')!r} model; "
                              f"SANA needs Gemma-2 (model_type 'gemma2'), e.g. gemma-2-2b-it")
    config = Gemma2Config.from_dict(config)
    config._attn_implementation = "eager"  # soft-capped attention; what diffusers runs
    return config


def _build_model(config, tensors: dict, *, device, dtype):
    """Gemma2Model built on the meta device and filled straight at `device`/`dtype`."""
    from transformers import Gemma2Model

    with torch.device("meta"):
        model = Gemma2Model(config)
    load_weights(model, tensors, device=device, dtype=dtype, on_cpu=("embed_tokens.",))  # see TextEncoder
    # Non-persistent buffers are not in any checkpoint: compute them as Gemma2Model does.
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):  # RoPE frequencies, float32
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, type(module)(config).to(device))
    if "embed_scale" in dict(model.embed_tokens.named_buffers()):  # transformers 5: sqrt(hidden) as a buffer
        model.embed_tokens.embed_scale = torch.tensor(config.hidden_size ** 0.5)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"this transformers version's Gemma2Model has buffers this loader does not fill: {left}")
    return model.eval().requires_grad_(False)


def _load_tokenizer(path: Path, spiece):
    """The Gemma tokenizer (<bos> added, right padding) from the file's `spiece_model` tensor or
    from tokenizer.json / tokenizer.model in the folder (or its tokenizer/ sibling)."""
    from transformers import GemmaTokenizerFast

    options = dict(local_files_only=True, add_bos_token=True, add_eos_token=False, padding_side="right")
    if spiece is not None:
        data = spiece.numpy().tobytes()
        _check_sentencepiece(path, data)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tokenizer.model").write_bytes(data)
            return GemmaTokenizerFast.from_pretrained(tmp, **options)
    looked = [path, path / "tokenizer", path.parent / "tokenizer"] if path.is_dir() else []
    for where in looked:
        if any((where / f).is_file() for f in TOKENIZER_FILES):
            if not (where / "tokenizer.json").is_file():
                _check_sentencepiece(where / "tokenizer.model", (where / "tokenizer.model").read_bytes())
            try:
                return GemmaTokenizerFast.from_pretrained(str(where), **options)
            except Exception as e:
                raise CheckpointError(f"the tokenizer in {where} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                                      f"it may be damaged: copy tokenizer.json / tokenizer.model again") from None
    places = [f"{' or '.join(TOKENIZER_FILES)} in {w}" for w in looked] \
        or [f"a 'spiece_model' tensor in {path.name}"]
    raise CheckpointError(f"no Gemma tokenizer found for {path}: looked for {'; '.join(places)}. Use the ComfyUI "
                          f"gemma_2_2b file (tokenizer inside) or the full Hugging Face folder of gemma-2-2b-it")


def _check_sentencepiece(path: Path, data: bytes) -> None:
    """Clear errors for missing packages or damaged bytes (transformers would fall back to tiktoken)."""
    try:
        import google.protobuf  # noqa: F401  (transformers reads the model proto with it)
        import sentencepiece
    except ImportError as e:
        raise ImportError(f"reading the SentencePiece tokenizer of {path.name} needs the packages sentencepiece "
                          f"and protobuf ({e}): pip install sentencepiece protobuf") from None
    try:
        sentencepiece.SentencePieceProcessor(model_proto=data)
    except Exception as e:
        raise CheckpointError(f"the SentencePiece tokenizer in {path} cannot be read ({str(e)[:200]}); "
                              f"the file may be damaged: download it again") from None
