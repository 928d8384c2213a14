"""The learned router: a small MLP from the round's signals to, per drafter and depth i, the
probability that at least i drafts are accepted; then the same best_choice as the rule.

Depth probabilities are cumulative products of sigmoids, so they never rise with depth. It is
trained (`python -m hybrid_sd.train.router`) on traces where every drafter was scored at
every position against the target's own output. Stored as `learned.safetensors` + `learned.json`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import best_choice
from .cost import LatencyTable
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
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "learned.safetensors"))
        (directory / "learned.json").write_text(json.dumps({"names": self.names, "k_max": self.k_max,
                                                            "hidden": self.hidden}) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "RouterMLP":
        directory = Path(directory)
        meta = json.loads((directory / "learned.json").read_text())
        model = cls(meta["names"], meta["k_max"], meta["hidden"])
        model.load_state_dict(load_file(str(directory / "learned.safetensors")))
        return model.eval()


class LearnedRouter:
    def __init__(self, model: RouterMLP, latency: LatencyTable, names: list[str], lam: float = 1.0):
        if list(names) != model.names:
            raise ValueError(f"the learned router was trained for drafters {model.names}, not {list(names)}")
        self.model, self.latency, self.names, self.lam = model, latency, names, lam

    @torch.inference_mode()
    def choose(self, signals: Signals, k_max: int):
        p = self.model(torch.tensor([signals.vector()]))[0]  # [D, k_max]
        expected = (1.0 + p.cumsum(-1)).tolist()
        return best_choice(lambda d, k: expected[d][min(k, self.model.k_max) - 1], self.latency, self.lam,
                           signals, self.names, k_max)
