"""Real architectures rebuilt from packages that do not import here, for their real weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["ONet", "PNet", "RNet", "VoiceEncoder", "derive_voice_encoder"]


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


# facenet-pytorch 2.6.0 (`facenet_pytorch/models/mtcnn.py`) imports requests on import, so its
# P-, R- and O-Net are rebuilt here layer for layer, under the same names (their `pnet.pt`,
# `rnet.pt`, `onet.pt` load strictly), with the same forward.


class _MTCNNNet(nn.Module):
    """Conv + PReLU (+ max-pool) layers, then dense + PReLU, then the heads.

    `output`: None returns every head as MTCNN does (a tuple), an index returns that one.
    """

    def __init__(self, convs, pools, dense, heads, output: int | None = None):
        super().__init__()
        self.output = output
        self.trunk: list[str] = []
        for i, (c_in, c_out, kernel) in enumerate(convs, start=1):
            self._add(f"conv{i}", nn.Conv2d(c_in, c_out, kernel_size=kernel))
            self._add(f"prelu{i}", nn.PReLU(c_out))
            if i <= len(pools):
                self._add(f"pool{i}", nn.MaxPool2d(*pools[i - 1], ceil_mode=True))
        self.dense = dense
        if dense:
            self.add_module(dense[0], nn.Linear(*dense[1:]))
            self.add_module(f"prelu{dense[0][-1]}", nn.PReLU(dense[2]))
        self.heads = list(heads)
        for name, head in heads.items():
            self.add_module(name, head)

    def _add(self, name: str, layer: nn.Module) -> None:
        self.add_module(name, layer)
        self.trunk.append(name)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        for name in self.trunk:
            x = getattr(self, name)(x)
        if self.dense:
            x = x.permute(0, 3, 2, 1).contiguous()
            x = getattr(self, self.dense[0])(x.view(x.shape[0], -1))
            x = getattr(self, f"prelu{self.dense[0][-1]}")(x)
        outputs = [getattr(self, name)(x) for name in self.heads]
        # The face odds (first head) are softmaxed over classes; returned last, as in MTCNN.
        outputs = (*outputs[1:], torch.softmax(outputs[0], dim=1))
        return outputs if self.output is None else outputs[self.output]


class PNet(_MTCNNNet):
    """MTCNN P-Net: (N, 3, H, W) to box offsets (N, 4, h, w) and face odds (N, 2, h, w)."""

    def __init__(self, output: int | None = None):
        convs = [(3, 10, 3), (10, 16, 3), (16, 32, 3)]
        heads = {"conv4_1": nn.Conv2d(32, 2, 1), "conv4_2": nn.Conv2d(32, 4, 1)}
        super().__init__(convs, [(2, 2)], None, heads, output)


class RNet(_MTCNNNet):
    """MTCNN R-Net: (N, 3, 24, 24) to box offsets (N, 4) and face odds (N, 2)."""

    def __init__(self, output: int | None = None):
        convs = [(3, 28, 3), (28, 48, 3), (48, 64, 2)]
        heads = {"dense5_1": nn.Linear(128, 2), "dense5_2": nn.Linear(128, 4)}
        super().__init__(convs, [(3, 2), (3, 2)], ("dense4", 576, 128), heads, output)


class ONet(_MTCNNNet):
    """MTCNN O-Net: (N, 3, 48, 48) to box offsets (N, 4), landmarks (N, 10), face odds (N, 2)."""

    def __init__(self, output: int | None = None):
        convs = [(3, 32, 3), (32, 64, 3), (64, 64, 3), (64, 128, 2)]
        heads = {
            "dense6_1": nn.Linear(256, 2),
            "dense6_2": nn.Linear(256, 4),
            "dense6_3": nn.Linear(256, 10),
        }
        super().__init__(convs, [(3, 2), (3, 2), (2, 2)], ("dense5", 1152, 256), heads, output)
