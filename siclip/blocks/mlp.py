"""The two-layer MLP of a transformer block: fc2(act(fc1(x)))."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

ACT_LAYERS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def create_act(act: str | nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """An activation module from a name in :data:`ACT_LAYERS`, a module, or a zero-argument factory."""
    if isinstance(act, nn.Module):
        return act
    if callable(act):
        return act()
    try:
        return ACT_LAYERS[act.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; choose one of {sorted(ACT_LAYERS)}") from None


class Mlp(nn.Module):
    """fc2(act(fc1(x))), ``dim -> hidden -> dim``. ``fc1`` is separate from the activation so that
    a parallel block can fuse ``fc1`` into its input projection and call :meth:`from_hidden`."""

    def __init__(self, dim: int, hidden_dim: int, *, act: str | nn.Module = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = create_act(act)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def from_hidden(self, hidden: Tensor) -> Tensor:
        """fc2(act(h)) for an already computed ``h = fc1(x)``."""
        return self.fc2(self.act(hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.from_hidden(self.fc1(x))
