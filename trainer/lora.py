"""LoRA on the transformer's attention and MLP projections (peft), saved in musubi/ComfyUI format.

Targets: every `nn.Linear` inside `transformer_blocks`, except the modulation layers
(`img_mod`, `txt_mod`) unless an include pattern brings them back. `--network_args` take
musubi's `include_patterns=[...]` / `exclude_patterns=[...]` (Python regular expressions,
searched in the dotted module path, e.g. `transformer_blocks.0.attn.to_q`), and
`target_set=musubi`: musubi-tuner's own set, every Linear of every block. musubi means to exclude
modulation (its pattern `.*(_mod_).*`), but matches it with `fullmatch` against names like
`transformer_blocks.0.img_mod.1`, where it never fires: its LoRAs hold `img_mod.1`, `txt_mod.1` and
the last block's unused text outputs too (840 layers on the real model, against 717 here).
A `--network_weights` file's layers are always trained, whatever the set.

Saved keys: `lora_unet_<module path with dots as underscores>.lora_down.weight` (peft's A),
`.lora_up.weight` (B) and `.alpha`; the delta ComfyUI applies is `up @ down * alpha / rank`,
which is exactly peft's scaling `lora_alpha / r`. Qwen-Image 2.1's layers are saved as
`transformer.<module path>`: ComfyUI's 2.1 model holds the SwiGLU gate and up projections as one
fused `img_mlp.gate_up`, and its key map (`comfy/lora.py`, the QwenImage branch) sends
`transformer.<block>.img_mlp.gate_layer` / `.proj` onto its first / second half of rows; a
`lora_unet_` name of the halves would name no weight of that model.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..common.files import atomic_path

LORA_PREFIX = "lora_unet_"
QWEN_IMAGE_21_LORA_PREFIX = "transformer."
BLOCKS_SCOPE = "transformer_blocks."
DEFAULT_EXCLUDE_PATTERNS = (r"(^|\.)img_mod(\.|$)", r"(^|\.)txt_mod(\.|$)")


class NetworkArgsError(ValueError):
    """A `--network_args` entry this trainer does not understand."""


TARGET_SETS = ("default", "musubi")


@dataclass(frozen=True)
class NetworkArgs:
    include_patterns: tuple[str, ...] = ()
    exclude_patterns: tuple[str, ...] = field(default=())
    target_set: str = "default"


def parse_network_args(values: Sequence[str] | None) -> NetworkArgs:
    """musubi's `key=value` network args; values are Python literals (lists of regex strings here)."""
    parsed = NetworkArgs()
    for entry in values or []:
        key, sep, raw = entry.partition("=")
        key = key.strip()
        if not sep:
            raise NetworkArgsError(f"--network_args entry {entry!r} is not key=value")
        if key == "target_set":
            name = raw.strip().strip("'\"")
            if name not in TARGET_SETS:
                raise NetworkArgsError(f"--network_args target_set={name}: choose one of {', '.join(TARGET_SETS)}")
            parsed = replace(parsed, target_set=name)
            continue
        if key not in ("include_patterns", "exclude_patterns"):
            raise NetworkArgsError(
                f"--network_args: unknown key {key!r} (supported: include_patterns, exclude_patterns, target_set)"
            )
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError) as exc:
            raise NetworkArgsError(f"--network_args {key}: {raw!r} is not a Python list of strings") from exc
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise NetworkArgsError(f"--network_args {key}: expected a list of regex strings, got {value!r}")
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise NetworkArgsError(f"--network_args {key}: bad regular expression {pattern!r}: {exc}") from exc
        if key == "include_patterns":
            parsed = replace(parsed, include_patterns=tuple(value))
        else:
            parsed = replace(parsed, exclude_patterns=tuple(value))
    return parsed


def lora_target_modules(transformer: torch.nn.Module, network_args: NetworkArgs) -> list[str]:
    """Dotted paths of the Linear layers that get LoRA.

    The last block's text-stream outputs (`attn.to_add_out`, `txt_mlp`) never reach the image
    prediction: LoRA there would get no gradient, so the default set skips them (musubi's keeps them).
    """
    musubi = network_args.target_set == "musubi"
    exclude = network_args.exclude_patterns + (() if musubi else DEFAULT_EXCLUDE_PATTERNS)
    targets = []
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.startswith(BLOCKS_SCOPE):
            continue
        if not musubi and is_dead_end(transformer, name):
            continue
        included = any(re.search(p, name) for p in network_args.include_patterns)
        excluded = any(re.search(p, name) for p in exclude)
        if included or not excluded:
            targets.append(name)
    return targets


def is_dead_end(transformer: torch.nn.Module, module_path: str) -> bool:
    """The last block's text-stream outputs: a LoRA there gets no gradient (DDP must be told)."""
    blocks: torch.nn.ModuleList = transformer.transformer_blocks  # type: ignore[assignment]
    last = f"{BLOCKS_SCOPE}{len(blocks) - 1}."
    return module_path.startswith((last + "attn.to_add_out", last + "txt_mlp."))


def lora_file_ranks(path: str | os.PathLike) -> dict[str, int]:
    """Rank of each layer a LoRA file holds (key stem -> rank), from its header alone; a file that
    is not safetensors or holds no LoRA layer (a base model, say) is an error saying so."""
    file = Path(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            ranks = {
                key[: -len(".lora_down.weight")]: handle.get_slice(key).get_shape()[0]
                for key in handle.keys()  # noqa: SIM118 (safe_open is not iterable)
                if key.endswith(".lora_down.weight")
            }
    except (SafetensorError, OSError) as exc:
        raise NetworkArgsError(f"--network_weights {file}: cannot be read as safetensors ({exc})") from exc
    if not ranks:
        raise NetworkArgsError(
            f"--network_weights {file}: no LoRA layers (no *.lora_down.weight keys); "
            "is it a base model rather than a LoRA?"
        )
    return ranks


def lora_file_modules(transformer: torch.nn.Module, path: str | os.PathLike) -> list[str]:
    """Module paths of the layers a LoRA file (this trainer's or musubi-tuner's) holds, in model order.

    A key that names no Linear of the transformer blocks is an error saying which.
    """
    file = Path(path)
    linears = {
        lora_key(name, transformer): name
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(BLOCKS_SCOPE)
    }
    stems = set(lora_file_ranks(file))
    unknown = sorted(stems - set(linears))
    if unknown:
        raise NetworkArgsError(
            f"--network_weights {file}: {len(unknown)} layer(s) name no Linear layer of this model's transformer "
            f"blocks (e.g. {', '.join(unknown[:3])}); is it a LoRA for this --model_version?"
        )
    return [name for key, name in linears.items() if key in stems]


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float, targets: list[str]) -> list[torch.nn.Parameter]:
    """Inject a fresh LoRA adapter (B = 0, so the model is unchanged) and return its parameters."""
    if not targets:
        raise NetworkArgsError("no layer matches the LoRA target/exclude patterns")
    # peft annotates lora_alpha as int; the scale alpha / rank takes any number
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]
        target_modules=targets,
        init_lora_weights=True,
        lora_dropout=0.0,
    )
    transformer.add_adapter(config)  # type: ignore[operator]  # diffusers' PeftAdapterMixin, hidden from mypy
    return [p for n, p in transformer.named_parameters() if "lora_" in n and p.requires_grad]


def lora_key(module_path: str, transformer: torch.nn.Module | None = None) -> str:
    """The name of a layer's LoRA weights in the files of `transformer`'s model (see the module doc)."""
    if transformer is not None and type(transformer).__name__ == "QwenImage21Transformer2DModel":
        return QWEN_IMAGE_21_LORA_PREFIX + module_path
    return LORA_PREFIX + module_path.replace(".", "_")


def comfy_lora_state_dict(
    transformer: torch.nn.Module, alpha: float, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The trained adapter under musubi/ComfyUI names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in get_peft_model_state_dict(transformer).items():
        module_path, _, kind = key.rpartition(".lora_")
        name = lora_key(module_path, transformer)
        suffix = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[kind]
        out[f"{name}.{suffix}"] = value.detach().to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def save_lora(
    path: str | os.PathLike,
    transformer: torch.nn.Module,
    alpha: float,
    metadata: dict[str, str],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the LoRA atomically (temporary file, then rename) and return its path."""
    target = Path(path)
    with atomic_path(target) as tmp:
        save_file(comfy_lora_state_dict(transformer, alpha, dtype), str(tmp), metadata=metadata)
    return target


def load_comfy_lora(transformer: torch.nn.Module, path: str | os.PathLike, alpha: float) -> int:
    """Start from a saved LoRA file (`--network_weights`): its deltas go into the fresh adapter.

    The file's rank must equal --network_dim; a different alpha is folded into the up weights so
    the delta `up @ down * alpha / rank` is unchanged. Returns the number of layers loaded.
    """
    file = Path(path)
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise NetworkArgsError(f"--network_weights {file}: cannot be read as safetensors ({exc})") from exc
    adapter = get_peft_model_state_dict(transformer)
    module_of = {lora_key(key.rpartition(".lora_")[0], transformer): key.rpartition(".lora_")[0] for key in adapter}
    stems = {key.rsplit(".", 2)[0] for key in tensors if key.endswith((".lora_down.weight", ".lora_up.weight"))}
    unknown = sorted(stems - set(module_of))
    if unknown:
        raise NetworkArgsError(
            f"--network_weights {file}: {len(unknown)} layer(s) are not LoRA targets of this model "
            f"(e.g. {', '.join(unknown[:3])}); give add_lora the file's layers (lora_file_modules)"
        )
    loaded = {}
    for stem in sorted(stems):
        down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        module = module_of[stem]
        expected = adapter[f"{module}.lora_A.weight"].shape
        if tuple(down.shape) != tuple(expected):
            raise NetworkArgsError(
                f"--network_weights {file}: {stem} has shape {tuple(down.shape)}, expected {tuple(expected)} "
                "(is --network_dim the file's rank?)"
            )
        file_alpha = float(tensors[f"{stem}.alpha"]) if f"{stem}.alpha" in tensors else float(down.shape[0])
        loaded[f"{module}.lora_A.weight"] = down.float()
        loaded[f"{module}.lora_B.weight"] = up.float() * (file_alpha / alpha)
    set_peft_model_state_dict(transformer, loaded)
    return len(stems)
