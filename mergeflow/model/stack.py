"""Stacked adapters (SFT, then DPO on top) as the one LoRA adapter they add up to.

PEFT runs several LoRA adapters active together by adding their deltas: a module's output is
``W x + sum_i s_i B_i A_i x``. That sum is one LoRA of rank ``sum_i r_i``: ``A`` stacks the
``A_i`` (rows), ``B`` the ``B_i`` scaled by their ``s_i`` (columns), with scale 1 (``r`` =
``lora_alpha`` per module, through ``rank_pattern`` / ``alpha_pattern`` keyed by the full module
name). :func:`stack_adapters` writes that adapter (float32, so the ``s_i`` cost no rounding),
and the merge takes it like any other: the base is read once for all of them.

Stacked: plain LoRA and rsLoRA on linear and embedding modules, with any ranks, alphas and
target modules each. Refused, naming both adapters: adapters of different bases, DoRA (its
magnitude is per adapter and does not add up), ``modules_to_save`` copies, trainable tokens and
LoRA biases (a vocabulary resize or a full copy in one would overwrite the other's).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergeflow.errors import InputError
from mergeflow.model.adapter import CONFIG_FILE, Adapter, LoraModule, load_adapter
from mergeflow.storage.hashing import sha256_file
from mergeflow.storage.staging import atomic_write

WEIGHTS = "adapter_model.safetensors"


def _problem(adapter: Adapter) -> str | None:
    """What keeps this adapter from adding up with others, or None."""
    if adapter.use_dora:
        return "it is a DoRA adapter (its magnitude vector is its own)"
    if adapter.replacements or adapter.base_layer:
        return "it saves full copies of modules (modules_to_save / a resized embedding)"
    if adapter.token_deltas:
        return "it trains token rows (trainable_token_indices)"
    if any(m.bias_key for m in adapter.modules.values()):
        return "it trains LoRA biases"
    return None


def check_stackable(adapters: list[Adapter]) -> None:
    """Refuse adapters that cannot be stacked, naming both of the pair at fault.

    Raises:
        InputError: different bases, or an adapter of a kind whose deltas do not add up.
    """
    first = adapters[0]
    for other in adapters[1:]:
        bases = first.config.base_model_name_or_path, other.config.base_model_name_or_path
        if all(bases) and bases[0] != bases[1]:
            raise InputError(f"{first.folder} and {other.folder}: adapters of different bases "
                             f"({bases[0]!r}, {bases[1]!r}) do not stack")
    for adapter in adapters:
        if problem := _problem(adapter):
            others = ", ".join(str(a.folder) for a in adapters if a is not adapter)
            raise InputError(f"{adapter.folder}: cannot be stacked with {others}: {problem}; "
                             "merge it on its own")
    for module in {m for a in adapters for m in a.modules}:
        kinds = {a.modules[module].kind for a in adapters if module in a.modules}
        if len(kinds) > 1:
            raise InputError(f"{first.folder} and {adapters[1].folder}: '{module}' is adapted "
                             f"as {' and '.join(sorted(kinds))}; they do not stack")


def _stacked_pair(adapters: list[Adapter], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's stacked A (sum r, in) and B (out, sum r), float32, B scaled by each s_i."""
    a_parts, b_parts = [], []
    for adapter in adapters:
        spec: LoraModule | None = adapter.modules.get(module)
        if spec is None:
            continue
        a_parts.append(adapter.read(spec.a_key).float())  # (r_i, in)
        b_parts.append(adapter.read(spec.b_key).float() * spec.scale)  # (out, r_i)
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def stacked_folder(folders: list[Path]) -> Path:
    """Where the stack of these adapter folders is written: a folder named by the digest of
    their files, so a rerun (a resume) finds the same adapter, byte for byte."""
    digest = hashlib.sha256()
    for folder in folders:
        for name in (CONFIG_FILE, WEIGHTS):
            path = folder / name
            digest.update(f"{name}:{sha256_file(path) if path.is_file() else ''};".encode())
    return Path(tempfile.gettempdir()) / "mergeflow-stacked" / digest.hexdigest()[:24]


def stack_adapters(folders: list[Path]) -> Path:
    """Write the one adapter ``folders`` add up to (see the module's text); returns its folder.

    Raises:
        InputError: adapters that do not stack (:func:`check_stackable`).
        AdapterError: an adapter folder that cannot be read.
    """
    adapters = [load_adapter(folder) for folder in folders]
    check_stackable(adapters)
    dest = stacked_folder(folders)
    if (dest / CONFIG_FILE).is_file() and (dest / WEIGHTS).is_file():
        return dest  # written by an earlier run of the same stack
    dest.mkdir(parents=True, exist_ok=True)
    tensors, ranks = {}, {}
    for module in sorted({m for a in adapters for m in a.modules}):
        spec = next(a.modules[module] for a in adapters if module in a.modules)
        a, b = _stacked_pair(adapters, module)
        tensors[spec.a_key], tensors[spec.b_key] = a.contiguous(), b.contiguous()
        ranks[module] = a.shape[0]
    save_file(tensors, str(dest / WEIGHTS))
    config = dict(adapters[0].raw_config)
    config.update(r=max(ranks.values()), lora_alpha=max(ranks.values()), use_rslora=False,
                  rank_pattern=ranks, alpha_pattern=dict(ranks),
                  target_modules=sorted(ranks), exclude_modules=None, layers_to_transform=None,
                  layers_pattern=None, modules_to_save=None)
    config["base_model_name_or_path"] = next(
        (a.config.base_model_name_or_path for a in adapters if a.config.base_model_name_or_path),
        None)
    atomic_write(dest / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dest
