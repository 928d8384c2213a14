"""Reading and writing drafter checkpoint directories (config.json + model.safetensors)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError
from ..models.loading import read_state_dict


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a drafter checkpoint (no config.json)")
    config = json.loads((path / "config.json").read_text())
    return config, read_state_dict(path)


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
                        f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
