"""A real architecture rebuilt from a package that does not import here, with its real weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["VoiceEncoder", "derive_voice_encoder"]


class VoiceEncoder(nn.Module):
    """Resemblyzer 0.1.4's speaker encoder, for `arch: "rebuilt:VoiceEncoder"`.

    A 3-layer LSTM over 40 mel channels; the last layer's final hidden state goes through
    Linear(256, 256) and ReLU and is L2-normalised. The layers and `forward` are those of
    `resemblyzer/voice_encoder.py`, whose package does not import without librosa and
    webrtcvad; the weights of its `pretrained.pt` load into this module strictly.
    """

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self.relu = nn.ReLU()

    def forward(self, mels: Tensor) -> Tensor:
        _, (hidden, _) = self.lstm(mels)
        embeds = self.relu(self.linear(hidden[-1]))
        return embeds / torch.norm(embeds, dim=1, keepdim=True)


def derive_voice_encoder(pretrained: Path, folder: Path) -> dict[str, Path]:
    """Writes the encoder as TorchScript, torch.export program and flat state dict.

    The same weights in three formats, so that their predictive spreads can be compared.
    Files already in `folder` are kept (the derivation is deterministic).

    Returns:
        The paths by format: "torchscript", "export", "state_dict".
    """
    paths = {
        "torchscript": folder / "voice_encoder.ts.pt",
        "export": folder / "voice_encoder.pt2",
        "state_dict": folder / "voice_encoder.state_dict.pt",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    # A legacy file saved on CUDA, with the training step and optimizer state beside it.
    checkpoint = torch.load(pretrained, map_location="cpu", weights_only=True)
    state = {k: v for k, v in checkpoint["model_state"].items() if not k.startswith("similarity")}
    model = VoiceEncoder()
    model.load_state_dict(state, strict=True)
    model.eval()
    torch.save(model.state_dict(), paths["state_dict"])
    torch.jit.save(torch.jit.script(model), str(paths["torchscript"]))
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        # The LSTM refreshes its `_flat_weights` list during tracing; torch warns about it.
        warnings.filterwarnings("ignore", message="The tensor attributes", category=UserWarning)
        program = torch.export.export(
            model, (torch.zeros(2, 50, 40),), dynamic_shapes={"mels": {0: batch}}
        )
    torch.export.save(program, str(paths["export"]))
    return paths
