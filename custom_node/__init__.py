# ComfyUI custom node: copy this file to ComfyUI/custom_nodes/comfy_env_attn/__init__.py
from comfy_env_attn.runtime.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
