"""An "Attention Backend" node for ComfyUI: routes a model's attention through the dispatcher
via transformer_options["optimized_attention_override"].

Load it as a custom node: copy custom_node/__init__.py of this repository to
ComfyUI/custom_nodes/comfy_env_attn/__init__.py (comfy-env-attn must be installed in
ComfyUI's Python).
"""

from __future__ import annotations

from typing import Any

from comfy_env_attn.core.backends import BACKENDS


def _choices() -> list[str]:
    out = ["auto", "auto (exact)"]
    try:
        from comfy_env_attn.runtime import dispatch  # imports torch: ComfyUI has it loaded

        dispatch.get_backend()
        out += [n for n in dispatch._S.backends if n not in out]
    except Exception:
        pass
    return out + [n for n in BACKENDS if n not in out]


def make_override(backend: str, exact: bool) -> Any:
    from comfy_env_attn.runtime import dispatch

    def override(func: Any, *args: Any, **kwargs: Any) -> Any:
        if dispatch._S.mode != backend or dispatch._S.exact != exact:
            dispatch.set_backend(backend, exact=exact)
        q, k, v, heads = args[:4]
        mask = kwargs.get("mask")
        skip_reshape = kwargs.get("skip_reshape", False)
        skip_output_reshape = kwargs.get("skip_output_reshape", False)
        if mask is not None and mask.dtype == __import__("torch").bool:
            return func(*args, **kwargs)
        if not skip_reshape:
            b = q.shape[0]
            q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)
                       for t in (q, k, v))
        if mask is not None and mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask is not None and mask.ndim == 3:
            mask = mask.unsqueeze(1)
        out = dispatch.dispatch_attention(q, k, v, attn_mask=mask)
        if not skip_output_reshape:
            out = out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1])
        return out

    return override


class AttentionBackend:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # ComfyUI's API
        return {"required": {"model": ("MODEL",), "backend": (_choices(),)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "advanced/attention"
    DESCRIPTION = ("Route this model's attention to the fastest backend comfy-env-attn "
                   "verified on this machine (auto), or to one verified backend.")

    def apply(self, model: Any, backend: str) -> tuple[Any]:
        exact = backend == "auto (exact)"
        name = "auto" if exact else backend
        m = model.clone()
        opts = m.model_options.setdefault("transformer_options", {})
        opts["optimized_attention_override"] = make_override(name, exact)
        return (m,)


NODE_CLASS_MAPPINGS = {"ComfyEnvAttnBackend": AttentionBackend}
NODE_DISPLAY_NAME_MAPPINGS = {"ComfyEnvAttnBackend": "Attention Backend (comfy-env-attn)"}
