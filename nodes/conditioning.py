"""SanaTextEncode: a prompt -> Gemma-2 caption as a standard CONDITIONING (core CLIPTextEncode on a
SANA CLIP gives the same, choosing the instruction by itself; see comfy_family.SanaTextModel).

CONDITIONING is ComfyUI's list of [embedding (B, 300, 2304), {"attention_mask": (B, 300)}]; the
mask (1 real token, 0 padding) rides in the dict, as ComfyUI does for other LLM text encoders, and
the padding rows of the embedding are zero, so that the mask survives ConditioningConcat (which
keeps only the first part's dict).
"""
import torch

from . import host


def caption_mask(emb: torch.Tensor, attention_mask) -> torch.Tensor:
    """The (B, T) mask of a caption (B, T, D): the conditioning's own when it fits, else its non-zero
    rows (after ConditioningConcat, whose dict is the first part's)."""
    if attention_mask is not None and tuple(attention_mask.shape) == tuple(emb.shape[:2]):
        return attention_mask
    return (emb != 0).any(dim=-1).to(torch.long)


def encode_text(text_encoder: host.ManagedModel, text: str, instruction: bool):
    """(embedding (1, T, D) with zero padding rows, mask (1, T)) on ComfyUI's intermediate device."""
    encoder = text_encoder.ready()
    try:
        emb, mask = host.current().runtime.encode_text(encoder, [text], instruction=bool(instruction))
    except FloatingPointError:  # Gemma-2 overflowed (float16): the library's message names its Python argument
        raise FloatingPointError(f"the text encoder produced NaN/inf values in {encoder.dtype}: Gemma-2 overflows "
                                 f"float16. Set dtype to bf16 (or fp32) on SANA Text Encoder Loader") from None
    finally:
        if text_encoder.offload_after_use:
            text_encoder.release()
    emb = emb * mask[..., None].to(emb.dtype)
    device = host.current().intermediate_device()
    return emb.to(device), mask.to(device)


class SanaTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("CLIP", {"tooltip": "Gemma-2 from SanaTextEncoderLoader."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The prompt. For the negative prompt leave it empty (SANA's default): "
                                           "empty text is encoded without the instruction."}),
            "instruction": ("BOOLEAN", {"default": True, "label_on": "on (prompt)", "label_off": "off (negative)",
                                        "tooltip": "on: prepend SANA's complex human instruction (how the model was "
                                                   "trained for prompts). off: plain text, for negative or empty "
                                                   "prompts. (Core CLIP Text Encode on this CLIP: on for any text, "
                                                   "off for empty text.)"}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The caption embedding with its attention mask, for SanaSampler or KSampler.",)
    FUNCTION = "encode"
    CATEGORY = "SANA"
    DESCRIPTION = ("Encodes a prompt with Gemma-2 the way SANA was trained (300 tokens, optional instruction); "
                   "unlike CLIP Text Encode it can encode a negative prompt with words without the instruction.")

    def encode(self, text_encoder, text, instruction):
        emb, mask = encode_text(host.unwrap(text_encoder, "text_encoder", "SanaTextEncode"), text, instruction)
        return ([[emb, {"attention_mask": mask}]],)
