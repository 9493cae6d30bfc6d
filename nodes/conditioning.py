"""SanaTextEncode: a prompt -> Gemma-2 caption as a standard CONDITIONING.

CONDITIONING is ComfyUI's list of [embedding (B, 300, 2304), {"attention_mask": (B, 300)}]; the
mask (1 real token, 0 padding) rides in the dict, as ComfyUI does for other LLM text encoders.
"""
from . import host


class SanaTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("SANA_TEXT_ENCODER", {"tooltip": "Gemma-2 from SanaTextEncoderLoader."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The prompt. For the negative prompt leave it empty (SANA's default): "
                                           "empty text is encoded without the instruction."}),
            "instruction": ("BOOLEAN", {"default": True, "label_on": "on (prompt)", "label_off": "off (negative)",
                                        "tooltip": "on: prepend SANA's complex human instruction (how the model was "
                                                   "trained for prompts). off: plain text, for negative or empty "
                                                   "prompts."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The caption embedding with its attention mask, for SanaSampler.",)
    FUNCTION = "encode"
    CATEGORY = "SANA"
    DESCRIPTION = "Encodes a prompt with Gemma-2 the way SANA was trained (300 tokens, optional instruction)."

    def encode(self, text_encoder, text, instruction):
        h = host.current()
        encoder = text_encoder.ready()
        try:
            emb, mask = h.runtime.encode_text(encoder, [text], instruction=bool(instruction))
        finally:
            if text_encoder.offload_after_use:
                text_encoder.release()
        device = h.intermediate_device()
        return ([[emb.to(device), {"attention_mask": mask.to(device)}]],)
