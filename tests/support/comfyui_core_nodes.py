"""ComfyUI's own node definitions for the core nodes of the Qwen-Image 2.1 example workflow, as a listing read
in ComfyUI's source: the shared ComfyUI of the e2e tier is 0.3.64, which has no `TextEncodeQwenImage21`, so
that example cannot be queued there and its unit test checks it against this listing instead.

- `TextEncodeQwenImage21`: `comfy_extras/nodes_qwen.py` of ComfyUI 0.38 (its `io.Schema`: `clip`, `prompt`,
  `negative_prompt`, optional `vae`, `resolution` 0..4096 step 32, and the Autogrow input `images`, whose
  sockets are `images.image_1` .. `images.image_16`, each an optional IMAGE; outputs positive, negative,
  latent). The CLIPLoader type it needs is `qwen_image`: `comfy/sd.py` builds the 2.1 text encoder for
  `CLIPType.QWEN_IMAGE` when the file is Qwen3-VL-8B.
- The loaders, KSampler, VAEDecode, LoadImage and the image outputs: `nodes.py`, read at 0.3.64 (the mirror of
  Comfy-Org/ComfyUI) with the same input names, kinds and outputs in the 0.38 listings seen (CLIPLoader's
  type list only grew). Model-file combos list what is installed, so only their kind is recorded.

Per node: `inputs` in the order the frontend shows them (widgets in `widgets_values` order, a seed's
`control_after_generate` and LoadImage's `upload` included), each with its kind: a socket type, a widget
kind (INT, FLOAT, STRING, BOOLEAN), or a tuple of choices ("FILES": installed model files); `optional` names;
`outputs` the output types.
"""

from __future__ import annotations

from typing import Any

FILES = "FILES"  # a combo of installed model files
AUTOGROW_IMAGES = tuple(f"images.image_{i}" for i in range(1, 17))
# values of the frontend-only widgets, as the UI format stores them
FRONTEND_WIDGETS = {"control_after_generate": ("fixed", "increment", "decrement", "randomize"), "upload": ("image",)}

CORE_NODES: dict[str, dict[str, Any]] = {
    "UNETLoader": {
        "inputs": {"unet_name": FILES, "weight_dtype": ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")},
        "optional": (),
        "outputs": ("MODEL",),
    },
    "LoraLoaderModelOnly": {
        "inputs": {"model": "MODEL", "lora_name": FILES, "strength_model": ("FLOAT", -100.0, 100.0)},
        "optional": (),
        "outputs": ("MODEL",),
    },
    "CLIPLoader": {
        "inputs": {"clip_name": FILES, "type": ("qwen_image",), "device": ("default", "cpu")},
        "optional": ("device",),
        "outputs": ("CLIP",),
    },
    "VAELoader": {"inputs": {"vae_name": FILES}, "optional": (), "outputs": ("VAE",)},
    "LoadImage": {
        "inputs": {"image": FILES, "upload": FRONTEND_WIDGETS["upload"]},
        "optional": (),
        "frontend_only": ("upload",),
        "outputs": ("IMAGE", "MASK"),
    },
    "TextEncodeQwenImage21": {
        "inputs": {
            "clip": "CLIP",
            "prompt": "STRING",
            "negative_prompt": "STRING",
            "vae": "VAE",
            "resolution": ("INT", 0, 4096),
            **{name: "IMAGE" for name in AUTOGROW_IMAGES},
        },
        "optional": ("vae", *AUTOGROW_IMAGES),
        "outputs": ("CONDITIONING", "CONDITIONING", "LATENT"),
    },
    "KSampler": {
        "inputs": {
            "model": "MODEL",
            "seed": ("INT", 0, 0xFFFFFFFFFFFFFFFF),
            "control_after_generate": FRONTEND_WIDGETS["control_after_generate"],
            "steps": ("INT", 1, 10000),
            "cfg": ("FLOAT", 0.0, 100.0),
            "sampler_name": ("euler",),  # of comfy.samplers.KSampler.SAMPLERS: the one ComfyUI's 2.1 graphs use
            "scheduler": ("simple",),  # of comfy.samplers.KSampler.SCHEDULERS, likewise
            "positive": "CONDITIONING",
            "negative": "CONDITIONING",
            "latent_image": "LATENT",
            "denoise": ("FLOAT", 0.0, 1.0),
        },
        "optional": (),
        "frontend_only": ("control_after_generate",),
        "outputs": ("LATENT",),
    },
    "VAEDecode": {"inputs": {"samples": "LATENT", "vae": "VAE"}, "optional": (), "outputs": ("IMAGE",)},
    "PreviewImage": {"inputs": {"images": "IMAGE"}, "optional": (), "outputs": ()},
    "SaveImage": {"inputs": {"images": "IMAGE", "filename_prefix": "STRING"}, "optional": (), "outputs": ()},
}
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN")


def is_widget(kind: Any) -> bool:
    """A widget input (a value in the graph), not a socket."""
    return kind == FILES or isinstance(kind, tuple) or kind in WIDGET_KINDS


def widget_names(class_type: str) -> list[str]:
    """The node's widgets in `widgets_values` order."""
    return [name for name, kind in CORE_NODES[class_type]["inputs"].items() if is_widget(kind)]
