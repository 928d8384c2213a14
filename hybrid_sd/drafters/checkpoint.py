"""Reading and writing drafter checkpoint directories (config.json + model.safetensors)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError
from ..models.loading import name_some, one_line, read_json, read_state_dict


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a drafter checkpoint (no config.json)")
    config = read_json(path / "config.json", "a drafter config")
    return config, read_state_dict(path)


# ---- config checks shared by the drafter formats: one line naming config.json and the key ----

def config_int(raw: dict, key: str, path, default=None, minimum: int = 1) -> int:
    """raw[key] as an int >= minimum (JSON has no int type of its own: 2.0 and true are refused)."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{Path(path) / 'config.json'}: {key} is {value!r}, expected an integer >= {minimum}")
    return value


def layer_id_list(value, key: str, path, n_layers: int, highest: int) -> list[int]:
    """Target layer ids from a config: a non-empty list of integers in [0, highest]."""
    file = Path(path) / "config.json"
    if not isinstance(value, list) or not value or not all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in value):
        raise UserError(f"{file}: {key} is {value!r}, expected a non-empty list of layer ids")
    bad = [i for i in value if not 0 <= i <= highest]
    if bad:
        raise UserError(f"{file}: {key} {value} name layers the target (with {n_layers} layers) does not have "
                        f"(ids must be in 0..{highest}): {bad}")
    return list(value)


def check_architecture(raw: dict, path) -> None:
    """Refuse what the drafter layers do not implement rather than compute something else."""
    file = Path(path) / "config.json"
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{file}: hidden_act {act!r} is not supported (only silu)")
    layer_types = raw.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list)
                                    or any(t != "full_attention" for t in layer_types)):
        raise UserError(f"{file}: layer_types {layer_types!r}: only full_attention layers are supported "
                        "(no sliding-window attention)")
    if raw.get("use_sliding_window"):
        raise UserError(f"{file}: use_sliding_window is set; sliding-window attention is not supported")
    archs = raw.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise UserError(f"{file}: architectures is {archs!r}, expected a list of class names")


def build_config(config_class, raw: dict, path):
    """transformers' config class from the raw dict; its own validation errors become one line."""
    try:
        return config_class.from_dict(raw)
    except Exception as e:  # transformers raises ValueError, TypeError or its strict-dataclass errors
        raise UserError(f"{Path(path) / 'config.json'}: {one_line(e)}") from None


def require_tensors(state: dict[str, torch.Tensor], names: tuple[str, ...], path) -> None:
    """Tensors the loader reads shapes from before building the module."""
    missing = [n for n in names if n not in state]
    if missing:
        raise UserError(f"{path}: the weights lack {name_some('tensor(s)', missing)}")
    flat = [n for n in names if state[n].ndim != 2]
    if flat:
        raise UserError(f"{path}: {flat[0]} has shape {list(state[flat[0]].shape)}, expected a matrix")


def write_checkpoint(path: str | Path, config: dict, state: dict[str, torch.Tensor], dtype=None) -> None:
    """Write config.json and model.safetensors; each file appears whole or not at all."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in state.items()}
    for name, write in (("model.safetensors", lambda f: save_file(state, f, metadata={"format": "pt"})),
                        ("config.json", lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))):
        fd, tmp = tempfile.mkstemp(prefix=name + ".", dir=path)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are shared files
            os.replace(tmp, path / name)
        except BaseException:
            os.unlink(tmp)
            raise


def check_fits(what: str, drafter_value, target_value, path) -> None:
    if drafter_value != target_value:
        raise UserError(f"{path}: the drafter's {what} is {drafter_value} but the target's is {target_value}; "
                        "this drafter was trained for another target")


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"{path}: weights do not match its config.json ({str(e).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise UserError(f"{path}: checkpoint keys do not match the format "
                        f"({name_some('missing', missing)}{', ' if missing and unexpected else ''}"
                        f"{name_some('unexpected', unexpected)})")
