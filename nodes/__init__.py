"""ComfyUI nodes over sana_core (imported as sana_nodes)."""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
