"""Tiny random-weight model files in the real formats, so that everything runs on a fresh
machine with no downloads (the README's main job, the tests). They make noise images:
real images need the real model files (see README)."""
from pathlib import Path

DEMO_CAPTION_DIM = 64  # hidden size of the tiny Gemma-2, and so the DiT's caption width


def write_demo_transformer(path: Path, *, sprint: bool = False, seed: int = 0) -> Path:
    """A tiny SANA DiT (original NVlabs key names) as .safetensors at `path`."""
    from safetensors.torch import save_file

    from .transformer import config_metadata, random_state_dict

    config = _demo_config(sprint)
    path = Path(path)
    save_file(random_state_dict(config, seed=seed), str(path), metadata=config_metadata(config))
    return path


def _demo_config(sprint: bool = False):
    """2 blocks of width 64: 2 self-attention heads of 32, 2 cross-attention heads of 32; the Sprint demo has
    the guidance embedder and q/k norm, as Sana-Sprint does."""
    from .transformer import SanaConfig
    return SanaConfig(depth=2, width=64, caption_dim=DEMO_CAPTION_DIM, self_heads=2, cross_heads=2, mlp_hidden=160,
                      qk_norm=sprint, sprint=sprint)


def write_demo_controlnet(path: Path, *, seed: int = 1) -> Path:
    """A tiny SANA ControlNet for the demo DiT, as NVlabs saves one (the official HED files): the whole model (the
    demo DiT's weights) plus one copied block `controlnet.0.copied_block.*` and its projections
    `controlnet.0.before_proj` / `after_proj`, random (zero when training starts; zero would add nothing), as
    .safetensors at `path`."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from .transformer import config_metadata, random_state_dict

    config = _demo_config()
    tensors = random_state_dict(config)  # the base it was trained on: the demo DiT (seed 0)
    copied = random_state_dict(dataclasses.replace(config, depth=1), seed=seed)
    tensors.update({"controlnet.0.copied_block." + k[len("blocks.0."):]: v for k, v in copied.items()
                    if k.startswith("blocks.0.")})
    g, C = torch.Generator().manual_seed(seed), config.width
    for name in ("before_proj", "after_proj"):
        tensors[f"controlnet.0.{name}.weight"] = torch.randn(C, C, generator=g) / C ** 0.5
        tensors[f"controlnet.0.{name}.bias"] = 0.1 * torch.randn(C, generator=g)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=config_metadata(config))
    return path


def write_demo_autoencoder(path: Path, *, seed: int = 0) -> Path:
    """A tiny DC-AE f32c32 (narrow stages, same structure) as .safetensors at `path`."""
    import torch
    from safetensors.torch import save_file
    from .autoencoder import DCAE, DCAEConfig, to_diffusers_names

    widths = (8, 16, 32, 32, 64, 64)  # 6 stages (32x), 32 latent channels, 8-channel heads
    config = DCAEConfig(decoder_widths=widths, encoder_widths=widths, head_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DCAE(config)  # PyTorch's default init; norms moved off (1, 0) so they matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.2 * torch.randn_like(p))
    tensors = {k: v.contiguous() for k, v in to_diffusers_names(model.state_dict()).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "description": "tiny random DC-AE f32c32 (demo)"})
    return path


def write_demo_text_encoder(path: Path, *, seed: int = 0) -> Path:
    """A tiny Gemma-2 as a ComfyUI-style single .safetensors with `spiece_model` inside."""
    import io
    import json

    import sentencepiece
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma2Config, Gemma2Model

    from .text_encoder import INSTRUCTIONS

    # A Gemma-style SentencePiece BPE model (<pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4, byte
    # fallback) trained on the instruction text and a few captions; deterministic.
    corpus = [line for lines in INSTRUCTIONS.values() for line in lines] + [
        "a cat sleeping on a warm windowsill", "a busy city street at dusk with glowing lamps",
        "a painting of a squirrel eating a burger", "a mountain lake at sunrise, mist over the water",
        "a red fox in a snowy forest", "portrait of an old sailor, dramatic light, oil painting",
        "a bowl of ramen, steam, close-up photo", "a futuristic city with flying cars and neon signs",
        "a cyberpunk cat with a neon sign that says Sana", "watercolor of a lighthouse on a rocky coast",
    ]
    spiece = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=spiece, model_type="bpe", vocab_size=640,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<mask>"], num_threads=1, minloglevel=2)
    vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece.getvalue()).get_piece_size()

    config = dict(model_type="gemma2", vocab_size=vocab, hidden_size=DEMO_CAPTION_DIM, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  query_pre_attn_scalar=16, sliding_window=4096, attn_logit_softcapping=50.0,
                  final_logit_softcapping=30.0, rms_norm_eps=1e-6, rope_theta=10000.0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Gemma2Model(Gemma2Config.from_dict(config)).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(shapes.items()):  # Gemma2ForCausalLM names, no lm_head (tied)
        std = 1.0 if name == "embed_tokens.weight" else 0.1 if "norm" in name else 0.02  # norms scale by 1 + w
        tensors["model." + name] = torch.randn(shape, generator=g) * std
    tensors["spiece_model"] = torch.frombuffer(bytearray(spiece.getvalue()), dtype=torch.uint8)
    path = Path(path)
    save_file(tensors, str(path), metadata={"config": json.dumps(config)})
    return path


def write_demo_models(folder: Path) -> dict:
    """All of them (the DiT, Sprint, DC-AE, Gemma, a ControlNet and a LoRA for the DiT) in ComfyUI's folder
    layout under `folder`; returns their paths."""
    folder = Path(folder)
    paths = {
        "transformer": folder / "diffusion_models" / "sana_demo.safetensors",
        "autoencoder": folder / "vae" / "sana_demo_dcae.safetensors",
        "text_encoder": folder / "text_encoders" / "gemma2_demo.safetensors",
        "sprint": folder / "diffusion_models" / "sana_sprint_demo.safetensors",
        "controlnet": folder / "controlnet" / "sana_demo_controlnet.safetensors",
        "lora": folder / "loras" / "sana_demo_lora.safetensors",
    }
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    write_demo_transformer(paths["transformer"])
    write_demo_transformer(paths["sprint"], sprint=True)
    write_demo_autoencoder(paths["autoencoder"])
    write_demo_text_encoder(paths["text_encoder"])
    write_demo_controlnet(paths["controlnet"])
    write_demo_lora(paths["lora"])
    return paths


def write_demo_lora(path: Path, *, depth: int = 2, width: int = 64, rank: int = 4, alpha: float | None = None,
                    seed: int = 0) -> Path:
    """A random LoRA for the demo transformer, keyed and stamped as diffusers' train_dreambooth_lora_sana.py
    saves one (PEFT lora_A / lora_B on the script's default targets to_q / to_k / to_v of both attentions,
    the LoraConfig, lora_alpha = `alpha` or the rank, in the `lora_adapter_metadata` header), at `path`."""
    import json

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(depth):
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v"):
                name = f"transformer.transformer_blocks.{block}.{attn}.{proj}"
                tensors[f"{name}.lora_A.weight"] = torch.randn(rank, width, generator=g) / width ** 0.5
                tensors[f"{name}.lora_B.weight"] = 0.5 * torch.randn(width, rank, generator=g) / rank ** 0.5
    config = {"r": rank, "lora_alpha": alpha or rank, "target_modules": ["to_k", "to_q", "to_v"], "peft_type": "LORA",
              "init_lora_weights": "gaussian", "lora_dropout": 0.0, "bias": "none", "use_dora": False,
              "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                                     indent=2, sort_keys=True)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path
