"""The learned router: a small MLP from the round's signals to, per drafter and depth i, the
probability that at least i drafts are accepted; then the same best_choice as the rule.

Depth probabilities are cumulative products of sigmoids, so they never rise with depth. It is
trained (`python -m hybrid_sd.train.router`) on traces where every drafter was scored at
each round of a decode of the target's own output (`train/traces.py`). Stored as `learned.safetensors` + `learned.json`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import DEFAULT_LAM, Router, best_choice
from .cost import LatencyTable, name_list, positive_int, read_json_object
from .signals import Signals


class RouterMLP(nn.Module):
    def __init__(self, names: list[str], k_max: int, hidden: int = 64):
        super().__init__()
        self.names, self.k_max, self.hidden = list(names), k_max, hidden
        n_in = 3 + 3 * len(names)  # Signals.vector()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, len(names) * k_max))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n_in] -> [B, D, k_max]: P(at least i+1 drafts accepted)."""
        logits = self.net(x).view(-1, len(self.names), self.k_max)
        return torch.sigmoid(logits).cumprod(-1)

    def save(self, directory: Path) -> None:
        from ..cli import write_atomic
        directory = Path(directory)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        write_atomic(directory / "learned.safetensors", writer=lambda tmp: save_file(state, tmp))
        write_atomic(directory / "learned.json", json.dumps({"names": self.names, "k_max": self.k_max,
                                                             "hidden": self.hidden}) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "RouterMLP":
        """Every malformed file is a ValueError naming it (load_router makes it one line)."""
        directory = Path(directory)
        if not (directory / "learned.json").is_file():
            raise ValueError("learned.json is missing (it holds the names and sizes of learned.safetensors)")
        meta = read_json_object(directory / "learned.json")
        model = cls(name_list(meta.get("names"), "learned.json"), positive_int(meta.get("k_max"), "learned.json: k_max"),
                    positive_int(meta.get("hidden"), "learned.json: hidden"))
        try:
            state = load_file(str(directory / "learned.safetensors"))
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise ValueError(f"learned.safetensors is damaged or cut short ({e})") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise ValueError(f"learned.safetensors does not match learned.json ({lines[-1] if lines else e})") from None
        return model.eval()


class LearnedRouter(Router):
    def __init__(self, model: RouterMLP, latency: LatencyTable, names: list[str], lam: float = DEFAULT_LAM):
        if list(names) != model.names:
            raise ValueError(f"the learned router was trained for drafters {model.names}, not {list(names)}")
        self.model, self.latency, self.names, self.lam = model, latency, names, lam

    @torch.inference_mode()
    def choose(self, signals: Signals, k_max: int):
        p = self.model(torch.tensor([signals.vector()]))[0]  # [D, k_max]
        expected = (1.0 + p.cumsum(-1)).tolist()
        return best_choice(lambda d, k: expected[d][min(k, self.model.k_max) - 1], self.latency, self.lam,
                           signals, self.names, k_max)
