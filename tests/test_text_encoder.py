"""Gemma-2 text encoding: equal to diffusers' SanaPipeline.encode_prompt, loaded offline from the
Hugging Face folder layouts and the ComfyUI single file, with clear errors for wrong files.

A tiny random Gemma-2 (hidden 64, 2 layers, GQA) and a Gemma-style SentencePiece tokenizer trained
here stand in for gemma-2-2b-it; diffusers gets the same model and tokenizer loaded by transformers
itself from the Hugging Face folder."""
import inspect
import io
import json
import logging
import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may touch the hub

import pytest
import sentencepiece
import torch
from conftest import rel_err
from safetensors.torch import save_file
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma2Model, GemmaTokenizer

from sana_core import CheckpointError, load_text_encoder
from sana_core.demo import DEMO_CAPTION_DIM, write_demo_text_encoder
from sana_core.text_encoder import (GEMMA2_2B_CONFIG, INSTRUCTIONS, MAX_TOKENS, _gemma_config, _gemma_tensors,
                                    instruction_text)

PROMPTS = [  # unchanged by diffusers' lower().strip(), different lengths, empty, non-ASCII
    "a cat sleeping on a warm windowsill",
    "a busy city street at dusk, glowing street lamps, a diverse crowd of people and a double-decker bus",
    "",
    "東京の夜景, café naïve, ß and 😀",
]
TO_INSTRUCT = [p for p in PROMPTS if p]  # an empty prompt is encoded as a negative (test_empty_prompt_...)
WORDS = ("a the of on in with and at by cat dog fox sleeping eating busy city street dusk glowing lamps crowd "
         "people bus glass towers painting squirrel burger mountain lake river forest blue green red small fluffy "
         "white warm sunny windowsill flowers scene photo portrait light").split()


@pytest.fixture(scope="module")
def spiece_model() -> bytes:
    """A Gemma-style SentencePiece BPE model: <pad>=0 <eos>=1 <bos>=2 <unk>=3 <mask>=4, byte fallback."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    lines += [line for lines_ in INSTRUCTIONS.values() for line in lines_]
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, model_type="bpe", vocab_size=700, hard_vocab_limit=False,
        character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=["<mask>"],
        num_threads=1, minloglevel=2)
    return out.getvalue()


@pytest.fixture(scope="module")
def gemma(spiece_model, tmp_path_factory):
    """The same random Gemma-2 in three layouts, and diffusers' SanaPipeline holding it."""
    from diffusers import SanaPipeline

    root = tmp_path_factory.mktemp("gemma")
    vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece_model).get_piece_size()
    config = Gemma2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                          attn_implementation="eager")
    torch.manual_seed(0)
    lm = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "norm" in name:  # Gemma norms scale by (1 + w): make them matter
                p.normal_(0, 0.2)
    tokenizer_config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                        "padding_side": "left", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                        "unk_token": "<unk>"}
    # (a) HF folder, sharded, tokenizer.model only (as gemma-2-2b-it ships it, plus tokenizer.json there)
    sharded = root / "gemma-2-sharded"
    lm.save_pretrained(sharded, max_shard_size="100KB")
    (sharded / "tokenizer.model").write_bytes(spiece_model)
    (sharded / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert len(list(sharded.glob("*.safetensors"))) > 1 and list(sharded.glob("*.index.json"))
    reference_tokenizer = GemmaTokenizer.from_pretrained(sharded)
    # (b) diffusers pipeline layout: text_encoder/ (Gemma2Model, one file) + tokenizer/ (tokenizer.json only)
    pipeline_dir = root / "sana-diffusers"
    reference_encoder = Gemma2Model.from_pretrained(sharded, attn_implementation="eager").eval()
    reference_encoder.save_pretrained(pipeline_dir / "text_encoder")
    reference_tokenizer.save_pretrained(pipeline_dir / "tokenizer")
    (pipeline_dir / "tokenizer" / "tokenizer.model").unlink(missing_ok=True)
    # (c) ComfyUI single file: Gemma2ForCausalLM names without lm_head, spiece_model, config in metadata
    single = root / "gemma2_single.safetensors"
    tensors = {k: v.contiguous() for k, v in lm.state_dict().items() if not k.startswith("lm_head")}
    tensors["spiece_model"] = torch.frombuffer(bytearray(spiece_model), dtype=torch.uint8)
    save_file(tensors, str(single), metadata={"config": config.to_json_string()})

    pipe = SanaPipeline(tokenizer=reference_tokenizer, text_encoder=reference_encoder, vae=None, transformer=None,
                        scheduler=None)
    return dict(sharded=sharded, pipeline=pipeline_dir, single=single, pipe=pipe, root=root, lm=lm)


@pytest.fixture(scope="module")
def encoders(gemma):
    return {layout: load_text_encoder(gemma[layout], device="cpu") for layout in ("sharded", "pipeline", "single")}


def diffusers_encode(pipe, prompts, instruction_lines):
    emb, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                         clean_caption=False, complex_human_instruction=instruction_lines)
    return emb, mask


def assert_same(ours, ref):
    (emb, mask), (ref_emb, ref_mask) = ours, ref
    assert emb.shape == ref_emb.shape and emb.shape[1] == MAX_TOKENS
    assert torch.equal(mask.cpu(), ref_mask.cpu())
    assert rel_err(emb, ref_emb) < 1e-5


@pytest.mark.parametrize("layout", ["sharded", "pipeline", "single"])
def test_instruction_matches_diffusers(gemma, encoders, layout):
    """Every layout gives diffusers' embeddings and mask, with its CHI text, for a mixed batch."""
    ours = encoders[layout].encode(TO_INSTRUCT, instruction="sana-diffusers")
    ref = diffusers_encode(gemma["pipe"], TO_INSTRUCT, list(INSTRUCTIONS["sana-diffusers"]))
    assert_same(ours, ref)
    assert len(set(ours[1].sum(1).tolist())) == len(TO_INSTRUCT)  # the batch really has different lengths
    assert ours[0].dtype == torch.float32 and ours[1].shape == (len(TO_INSTRUCT), MAX_TOKENS)


def test_tokenizer_from_spiece_model_matches_sentencepiece(spiece_model, encoders):
    """The tokenizer built from the bare `spiece_model` bytes gives SentencePiece's own ids, after <bos>."""
    sp = sentencepiece.SentencePieceProcessor(model_proto=spiece_model)
    for text in PROMPTS + [instruction_text(True) + PROMPTS[1], "  two  spaces\nand a newline 123"]:
        assert encoders["single"].tokenizer.encode(text) == [sp.bos_id()] + sp.encode(text)


def test_default_instruction_is_the_official_text(gemma, encoders):
    """instruction=True uses the official NVlabs/Sana CHI, which differs from diffusers' in its quotes."""
    te = encoders["single"]
    official, diffusers_text = INSTRUCTIONS["sana-official"], INSTRUCTIONS["sana-diffusers"]
    assert official[1:] == diffusers_text[1:] and official[0].replace('"', "'") == diffusers_text[0]
    default = te.encode(PROMPTS[:2])
    assert_same(default, diffusers_encode(gemma["pipe"], PROMPTS[:2], list(official)))
    assert rel_err(default[0], te.encode(PROMPTS[:2], instruction="sana-diffusers")[0]) > 1e-3


def test_diffusers_instruction_text_unchanged():
    """The 'sana-diffusers' preset is exactly SanaPipeline's default complex_human_instruction."""
    from diffusers import SanaPipeline

    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert list(INSTRUCTIONS["sana-diffusers"]) == default


def test_custom_instruction_matches_diffusers(gemma, encoders):
    text = "Describe this picture:\n"
    assert instruction_text(text) == text
    assert_same(encoders["single"].encode(TO_INSTRUCT, instruction=text),
                diffusers_encode(gemma["pipe"], TO_INSTRUCT, [text]))


def test_no_instruction_matches_diffusers_negative_prompt(gemma, encoders):
    """instruction=False: the prompt alone padded to 300, as diffusers encodes negative prompts."""
    _, _, ref_emb, ref_mask = gemma["pipe"].encode_prompt(["x"] * len(PROMPTS), negative_prompt=PROMPTS,
                                                          device="cpu", complex_human_instruction=None)
    for te in encoders.values():
        assert_same(te.encode(PROMPTS, instruction=False), (ref_emb, ref_mask))


def test_lowercase_only_when_asked(gemma, encoders):
    """diffusers lowercases and strips; we strip always and lowercase only with lowercase=True."""
    te, prompt = encoders["single"], "  A Cat Sleeping On A Warm Windowsill "
    ref = diffusers_encode(gemma["pipe"], [prompt], list(INSTRUCTIONS["sana-diffusers"]))
    assert_same(te.encode(prompt, instruction="sana-diffusers", lowercase=True), ref)
    kept = te.encode(prompt, instruction="sana-diffusers")
    assert rel_err(kept[0], ref[0]) > 1e-3
    assert_same(kept, te.encode(prompt.strip(), instruction="sana-diffusers"))


@pytest.mark.parametrize("instruction", ["sana-diffusers", False])
def test_long_prompt_truncated_with_warning(gemma, encoders, caplog, instruction):
    """Over the limit: truncated as diffusers does, with a warning that counts the dropped tokens."""
    te = encoders["single"]
    prompt = " ".join(WORDS * 12)
    chi = instruction_text(instruction)
    limit = (len(te.tokenizer.encode(chi)) + MAX_TOKENS - 2) if chi else MAX_TOKENS
    dropped = len(te.tokenizer.encode(chi + prompt)) - limit
    assert dropped > 0
    with caplog.at_level(logging.WARNING, logger="sana_core"):
        ours = te.encode([PROMPTS[0], prompt], instruction=instruction)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("sana_core")]
    assert len(messages) == 1 and "prompt 1" in messages[0] and f"last {dropped} tokens" in messages[0]
    assert ours[1][1].all()  # the long prompt fills all 300 positions
    if chi:
        ref = diffusers_encode(gemma["pipe"], [PROMPTS[0], prompt], list(INSTRUCTIONS[instruction]))
    else:
        _, _, *ref = gemma["pipe"].encode_prompt(["x", "x"], negative_prompt=[PROMPTS[0], prompt], device="cpu")
    assert_same(ours, ref)


def test_device_dtype_and_offload(gemma, encoders):
    te = load_text_encoder(gemma["single"], device="cpu", dtype=torch.bfloat16)
    assert te.dtype == torch.bfloat16 and te.device.type == "cpu" and te.hidden_size == 64
    assert te.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE frequencies stay float32, as in transformers
    assert te.to("cpu") is te and te.offload() is te and te.device == torch.device("cpu")
    emb, mask = te.encode(PROMPTS[:2])
    assert emb.dtype == torch.bfloat16 and mask.shape == (2, MAX_TOKENS)
    assert rel_err(emb.float(), encoders["single"].encode(PROMPTS[:2])[0]) < 0.05
    assert not any(p.requires_grad for p in te.model.parameters())


def test_embedding_table_stays_on_the_cpu(gemma):
    """Moving the encoder to a device moves Gemma's layers, never the token-embedding table (1.1 GiB of
    Gemma-2-2B): it is looked up on the CPU. "meta" stands in for a GPU here."""
    te = load_text_encoder(gemma["single"], device="cpu")
    te.to("meta")
    assert te.device == torch.device("meta") and te.model.layers[0].mlp.up_proj.weight.is_meta
    assert te.model.norm.weight.is_meta and te.model.embed_tokens.weight.device == torch.device("cpu")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(te.on_device) == count(te.model) - te.model.embed_tokens.weight.numel()  # what hosts move


def test_demo_file_loads(tmp_path):
    """The demo writer makes a deterministic single file whose hidden size is the demo DiT's caption width."""
    a, b = write_demo_text_encoder(tmp_path / "a.safetensors"), write_demo_text_encoder(tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()
    te = load_text_encoder(a, device="cpu")
    emb, mask = te.encode(["a red fox in a snowy forest", ""])
    assert te.hidden_size == DEMO_CAPTION_DIM and emb.shape == (2, MAX_TOKENS, DEMO_CAPTION_DIM)
    assert torch.isfinite(emb).all() and mask[0].sum() > mask[1].sum() > 0


def test_gemma_2b_geometry_assumed_for_hidden_2304():
    """A single file of hidden size 2304 with no config gets Gemma-2-2B's geometry (meta device only)."""
    with torch.device("meta"):
        full = Gemma2Model(Gemma2Config.from_dict(dict(GEMMA2_2B_CONFIG, num_hidden_layers=3)))
    path = Path("gemma_2_2b.safetensors")
    tensors = _gemma_tensors(path, {"model." + k: v for k, v in full.state_dict().items()})
    config = _gemma_config(path, tensors, metadata={})
    assert (config.num_hidden_layers, config.vocab_size, config.head_dim, config.num_attention_heads,
            config.num_key_value_heads) == (3, 256000, 256, 8, 4)
    assert (config.attn_logit_softcapping, config.final_logit_softcapping, config.query_pre_attn_scalar,
            config.sliding_window, config.intermediate_size) == (50.0, 30.0, 256, 4096, 9216)
    with torch.device("meta"):
        params = sum(p.numel() for p in Gemma2Model(Gemma2Config.from_dict(GEMMA2_2B_CONFIG)).parameters())
    assert params == 2_614_341_888  # gemma-2-2b


# ---- bad input: each a clear error that says what was expected -------------------------------------------

def test_folder_without_weights(tmp_path):
    (tmp_path / "README.md").write_text("nothing here")
    with pytest.raises(CheckpointError, match=r"no \.safetensors weights.*README\.md"):
        load_text_encoder(tmp_path, device="cpu")


def test_folder_without_tokenizer_lists_where_it_looked(gemma, tmp_path):
    folder = tmp_path / "gemma-2-2b-it"
    gemma["lm"].save_pretrained(folder)
    with pytest.raises(CheckpointError, match="no Gemma tokenizer") as e:
        load_text_encoder(folder, device="cpu")
    for where in (folder, folder / "tokenizer", tmp_path / "tokenizer"):
        assert str(where) in str(e.value)


def test_damaged_tokenizer(gemma, tmp_path):
    folder = tmp_path / "gemma"
    gemma["lm"].save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model" * 10)
    with pytest.raises(CheckpointError, match="SentencePiece tokenizer in .*tokenizer.model cannot be read"):
        load_text_encoder(folder, device="cpu")
    tensors = {k: v.contiguous() for k, v in gemma["lm"].state_dict().items() if not k.startswith("lm_head")}
    save_file(dict(tensors, spiece_model=torch.zeros(64, dtype=torch.uint8) + 7), str(tmp_path / "bad.safetensors"),
              metadata={"config": gemma["lm"].config.to_json_string()})
    with pytest.raises(CheckpointError, match="bad.safetensors cannot be read.*download it again"):
        load_text_encoder(tmp_path / "bad.safetensors", device="cpu")
    save_file(tensors, str(tmp_path / "no_spiece.safetensors"),
              metadata={"config": gemma["lm"].config.to_json_string()})
    with pytest.raises(CheckpointError, match="looked for a 'spiece_model' tensor in no_spiece.safetensors"):
        load_text_encoder(tmp_path / "no_spiece.safetensors", device="cpu")


def test_other_hidden_size_needs_config(gemma, tmp_path):
    tensors = {k: v.contiguous() for k, v in gemma["lm"].state_dict().items() if not k.startswith("lm_head")}
    save_file(tensors, str(tmp_path / "gemma_small.safetensors"))
    with pytest.raises(CheckpointError, match="hidden size 64 .*needs its config.json"):
        load_text_encoder(tmp_path / "gemma_small.safetensors", device="cpu")


@pytest.mark.parametrize("keys, looks", [
    (["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "blocks.0.attn.qkv.weight", "final_layer.scale_shift_table"],
     "SANA transformer"),
    (["encoder.project_in.conv.weight", "decoder.project_in.conv.weight", "decoder.stages.0.0.conv1.conv.weight"],
     "autoencoder"),
    (["model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"],
     "not Gemma-2"),  # e.g. a Llama/Qwen/Gemma-1 file: no pre_feedforward_layernorm
])
def test_wrong_component(tmp_path, keys, looks):
    save_file({k: torch.zeros(4, 4) for k in keys}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match=looks):
        load_text_encoder(tmp_path / "wrong.safetensors", device="cpu")


def test_bad_instruction_type(encoders):
    with pytest.raises(TypeError, match="instruction must be"):
        encoders["single"].encode("a cat", instruction=3)


def test_empty_prompt_encodes_as_diffusers_negative_prompt(gemma, encoders):
    """The usual ComfyUI negative: empty text at default settings (instruction on) must not raise; it is
    diffusers' negative_prompt="" embedding (no instruction, 300 tokens), alone or in a batch."""
    _, _, ref_emb, ref_mask = gemma["pipe"].encode_prompt(["x"], negative_prompt="", device="cpu",
                                                          complex_human_instruction=None)
    te = encoders["single"]
    for instruction in (True, "sana-diffusers", False):
        assert_same(te.encode("  ", instruction=instruction), (ref_emb, ref_mask))
    mixed = te.encode([PROMPTS[0], ""], instruction="sana-diffusers")
    with_chi = diffusers_encode(gemma["pipe"], PROMPTS[:1], list(INSTRUCTIONS["sana-diffusers"]))
    assert_same((mixed[0][:1], mixed[1][:1]), with_chi)
    assert_same((mixed[0][1:], mixed[1][1:]), (ref_emb, ref_mask))
