"""Tests of bnnify.usecases.convert: every format in, checkpoints equal to the library's."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from model_files import build_cnn, plain_state, shared_files
from torch import nn

import bnnify
from bnnify.bnn import BayesianModule, get_posterior, get_prior
from bnnify.demo import build_model
from bnnify.errors import (
    ArgumentTypeError,
    FormatError,
    InvalidArgumentError,
    OutputExistsError,
    SpecError,
    UnsafeInputError,
    UsageError,
)
from bnnify.formats import safetensors_io
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.model_files import from_module, load_model
from bnnify.formats.report import read_report
from bnnify.formats.safetensors_io import read_header
from bnnify.formats.spec import read_spec, resolve_spec
from bnnify.usecases.convert import convert, output_paths, parse_size
from bnnify.usecases.seeding import seeded

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_configs"
POSTERIORS = ["gaussian", "pretrained_gaussian"]
PRIORS = ["gaussian", "laplace", "scale_mixture", "empirical_gaussian"]
CLOSED_FORM_PRIORS = ["gaussian", "laplace", "empirical_gaussian"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return shared_files(tmp_path_factory)


@pytest.fixture(scope="module")
def demo_state(tmp_path_factory):
    """A state dict of the demo architecture (BatchNorm statistics off their defaults)."""
    folder = tmp_path_factory.mktemp("demo_state")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = build_model().train()
        net(torch.randn(16, 8))
    net.eval()
    torch.save(net.state_dict(), folder / "demo.state.pt")
    safetensors_io.save_file(plain_state(net), folder / "demo.safetensors")
    return net, folder / "demo.state.pt", folder / "demo.safetensors"


def run(path, folder: Path, spec=None, *, trust_pickle=False, name="out", **kwargs):
    """Converts `path` into `folder/<name>.bnn.safetensors` and `folder/<name>.kl.safetensors`."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / f"{name}.bnn.safetensors"
    report = folder / f"{name}.kl.safetensors"
    with load_model(path, trust_pickle=trust_pickle) as model:
        result = convert(
            model, spec or resolve_spec(None), output=checkpoint, report=report, **kwargs
        )
    return result, checkpoint, report


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def float_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.is_floating_point()}


# ------------------------------------------------------------------ every format


@pytest.mark.parametrize("posterior", POSTERIORS)
@pytest.mark.parametrize("model", ["mlp", "cnn", "lstm"])
def test_every_format_gives_the_same_variational_tensors(models, tmp_path, model, posterior):
    spec = resolve_spec(None, posterior=posterior)
    formats = ["torchscript", "export", "state_dict", "safetensors", "sharded"]
    if posterior == "pretrained_gaussian" and (model, "pickled") in models.files:
        # The module path seeds once for the whole module: only deterministic
        # initialisations are comparable with the per-tensor path.
        formats.append("pickled")
    states, deterministic = {}, {}
    params = float_parameters(models.modules[model])
    for fmt in formats:
        result, _, _ = run(
            models.path(model, fmt), tmp_path / fmt, spec, trust_pickle=fmt == "pickled"
        )
        assert sorted(p.name for p in result.parameters) == sorted(params)
        assert result.elements == sum(p.numel() for p in params.values())
        # A sharded input gives a sharded output: the checkpoint is its index.
        with Checkpoint(result.outputs[-2]) as ckpt:
            states[fmt] = ckpt.variational_state()
            deterministic[fmt] = ckpt.deterministic_state()
    for fmt in formats[1:]:
        assert_same_tensors(states[fmt], states["torchscript"])
        assert_same_tensors(deterministic[fmt], deterministic["torchscript"])
    # The buffers (BatchNorm statistics) are kept as they were.
    for name, buffer in models.modules[model].named_buffers():
        assert torch.equal(deterministic["state_dict"][name], buffer)
    if posterior == "pretrained_gaussian":
        for name, weight in params.items():
            assert torch.equal(states["torchscript"][f"{name}.mu"], weight)


def test_sharded_input_gives_sharded_output_equal_to_a_single_file(models, tmp_path):
    index = models.path("cnn", "sharded")
    single, single_path, _ = run(models.path("cnn", "safetensors"), tmp_path / "single")
    result, target, report = run(index, tmp_path / "sharded", shard_size=300)
    shards = sorted((tmp_path / "sharded").glob("out.bnn-*-of-*.safetensors"))
    index_out = tmp_path / "sharded" / "out.bnn.safetensors.index.json"
    assert len(shards) > 1
    assert result.outputs == [*shards, index_out, report]
    assert not target.exists()
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == sorted(
        p.name for p in result.outputs
    )
    with Checkpoint(index_out) as ckpt, Checkpoint(single_path) as one:
        assert_same_tensors(ckpt.variational_state(), one.variational_state())
        assert_same_tensors(ckpt.deterministic_state(), one.deterministic_state())
        assert ckpt.source["format"] == "sharded_safetensors"
        # docs/format.md: every shard header carries the metadata, the index its total size.
        for shard in shards:
            metadata, _ = read_header(shard)
            assert metadata["bnnify.parameters"] == ckpt.metadata["bnnify.parameters"]
        content = json.loads(index_out.read_text())
        assert int(content["metadata"]["total_size"]) == sum(
            info.nbytes for shard in shards for info in read_header(shard)[1].values()
        )
        assert set(content["weight_map"].values()) == {s.name for s in shards}
    assert result.kl_sum == pytest.approx(single.kl_sum, rel=1e-12)


# ------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("posterior", POSTERIORS)
def test_the_same_input_and_seed_give_byte_identical_files(models, tmp_path, posterior):
    spec = resolve_spec(None, posterior=posterior, prior="scale_mixture", seed=7)
    first = run(models.path("cnn", "state_dict"), tmp_path / "a", spec)
    second = run(models.path("cnn", "state_dict"), tmp_path / "b", spec)
    for a, b in zip(first[1:], second[1:], strict=True):
        assert a.read_bytes() == b.read_bytes()
    other = run(
        models.path("cnn", "state_dict"),
        tmp_path / "c",
        resolve_spec(None, posterior=posterior, prior="scale_mixture", seed=8),
    )
    with Checkpoint(first[1]) as a, Checkpoint(other[1]) as c:
        same_mu = torch.equal(a.tensor("0.weight.mu"), c.tensor("0.weight.mu"))
    # A random initialisation depends on the seed; the pretrained one does not.
    assert same_mu == (posterior == "pretrained_gaussian")
    # Monte Carlo KL depends on the seed for both.
    assert first[0].kl_sum != other[0].kl_sum


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("posterior", POSTERIORS)
def test_arch_conversion_equals_the_library_bit_for_bit(demo_state, tmp_path, posterior, prior):
    net, state_path, safetensors_path = demo_state
    spec = resolve_spec(SAMPLES / "state_dict_arch.yaml", posterior=posterior, prior=prior)
    assert spec.arch == "bnnify.demo:build_model"
    module = build_model()
    module.load_state_dict(net.state_dict())
    with seeded(spec.seed, "", spec.device):
        bnn = BayesianModule(module, spec.posterior, spec.prior)
    expected = bnn.variational_state()
    for path in (state_path, safetensors_path):
        folder = tmp_path / path.suffix[1:]
        result, checkpoint, report = run(
            path, folder, spec, arch=spec.arch, arch_kwargs=spec.arch_kwargs
        )
        with Checkpoint(checkpoint) as ckpt:
            assert_same_tensors(ckpt.variational_state(), expected)
            assert_same_tensors(ckpt.deterministic_state(), dict(bnn.module.state_dict()))
            assert {r.kind for r in ckpt.deterministic.values()} == {"buffer"}
        kls = bnn.kl_by_parameter(approx_num_samples=result.samples)
        if result.samples is None:
            # One report function (bnnify.bnn.kl_report) on equal values stored at other
            # addresses: equal to the last bit, whatever the alignment and thread count.
            assert [p.kl for p in result.parameters] == [
                float(kls[p.name]) for p in result.parameters
            ]
        assert read_report(report).names == bnn.reparametrized_names()


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("posterior", POSTERIORS)
def test_tensorwise_conversion_equals_the_library_bit_for_bit(
    demo_state, tmp_path, posterior, prior
):
    net, state_path, _ = demo_state
    spec = resolve_spec(None, posterior=posterior, prior=prior, seed=5)
    _, checkpoint, _ = run(state_path, tmp_path, spec)
    expected = {}
    for name, weight in float_parameters(net).items():
        with seeded(spec.seed, name):
            posterior_module = get_posterior(spec.posterior, weight.detach())
            prior_module = get_prior(spec.prior, weight.detach())
        expected.update({f"{name}.{k}": t for k, t in posterior_module.state_dict().items()})
        expected.update(
            {f"{name}.prior.{k}": t for k, t in prior_module.named_buffers() if t.dim() > 0}
        )
    with Checkpoint(checkpoint) as ckpt:
        state = ckpt.variational_state()
        assert_same_tensors(state, expected)
        assert sorted(ckpt.deterministic) == sorted(dict(net.named_buffers()))
    if posterior == "pretrained_gaussian":
        # A deterministic initialisation: the module path gives the very same tensors.
        module = build_model()
        module.load_state_dict(net.state_dict())
        assert_same_tensors(
            state, BayesianModule(module, spec.posterior, spec.prior).variational_state()
        )


@pytest.mark.parametrize("dtype", [None, "float64"])
@pytest.mark.parametrize("prior", CLOSED_FORM_PRIORS)
def test_to_bayesian_kl_matches_the_report(models, tmp_path, prior, dtype):
    spec = resolve_spec(None, posterior="gaussian", prior=prior, dtype=dtype)
    result, checkpoint, report = run(models.path("cnn", "torchscript"), tmp_path, spec)
    total = read_report(report).total
    assert total == pytest.approx(result.kl_sum, rel=1e-12)
    rel = 1e-10 if dtype == "float64" else 1e-5
    float_type = torch.float64 if dtype else torch.float32
    with Checkpoint(checkpoint) as ckpt:
        with_arch = ckpt.to_bayesian(build_cnn().to(float_type))
        for bnn in (with_arch, ckpt.to_bayesian()):
            with torch.no_grad():
                kl = bnn.kl_divergence()
            assert kl.dtype == float_type
            assert float(kl) == pytest.approx(total, rel=rel)
            assert bnn.num_variational_elements == result.elements
    # The architecture runs with sampled weights, and with the BatchNorm statistics kept.
    assert torch.equal(
        with_arch.module[1].running_var, models.modules["cnn"][1].running_var.to(float_type)
    )
    with torch.no_grad():
        assert with_arch(models.examples["cnn"].to(float_type)).shape == (2, 2)


def test_dtype_converts_floating_tensors_only(models, tmp_path):
    spec = resolve_spec(None, dtype="float64")
    result, checkpoint, _ = run(models.path("cnn", "state_dict"), tmp_path, spec)
    assert {p.dtype for p in result.parameters} == {"float64"}
    with Checkpoint(checkpoint) as ckpt:
        assert {t.dtype for t in ckpt.variational_state().values()} == {torch.float64}
        kept = ckpt.deterministic_state()
        assert kept["1.running_mean"].dtype == torch.float64
        assert kept["1.num_batches_tracked"].dtype == torch.int64


def test_a_partial_spec_keeps_the_rest_deterministic(models, tmp_path):
    spec = read_spec(SAMPLES / "partial.yaml")
    result, checkpoint, _ = run(models.path("cnn", "torchscript"), tmp_path, spec)
    weights = [n for n in float_parameters(models.modules["cnn"]) if n.endswith(".weight")]
    assert [p.name for p in result.parameters] == weights
    with Checkpoint(checkpoint) as ckpt:
        assert sorted(ckpt.parameters) == sorted(weights)
        assert ckpt.deterministic["0.bias"].kind == "parameter"
        assert ckpt.deterministic["1.running_var"].kind == "buffer"
        assert torch.equal(ckpt.tensor("0.bias"), models.modules["cnn"][0].bias)


@pytest.mark.parametrize(
    ("posterior", "args"),
    [("pretrained_gaussian", ()), ("pretrained_gaussian", ("sigma=0.01",)), ("gaussian", ())],
)
def test_a_state_dict_of_non_contiguous_weights_converts(tmp_path, posterior, args):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4))
    net[2].weight = nn.Parameter(torch.randn(12, 4).t())
    state = net.to(memory_format=torch.channels_last).state_dict()
    assert not state["0.weight"].is_contiguous() and not state["2.weight"].is_contiguous()
    torch.save(state, tmp_path / "strided.pt")
    torch.save({k: v.contiguous() for k, v in state.items()}, tmp_path / "plain.pt")
    spec = resolve_spec(None, posterior=posterior, posterior_args=args, seed=3)
    strided = run(tmp_path / "strided.pt", tmp_path / "a", spec)
    plain = run(tmp_path / "plain.pt", tmp_path / "b", spec)
    with Checkpoint(strided[1]) as a, Checkpoint(plain[1]) as b:
        assert_same_tensors(a.variational_state(), b.variational_state())
        if posterior == "pretrained_gaussian":
            assert torch.equal(a.tensor("0.weight.mu"), state["0.weight"])
            assert torch.equal(a.tensor("2.weight.mu"), state["2.weight"])
    # The report function sees the same values: the same KL to the last bit.
    assert [p.kl for p in strided[0].parameters] == [p.kl for p in plain[0].parameters]


class MixedCaseNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.conv1_BN = nn.BatchNorm2d(2)
        self.LayerNorm = nn.LayerNorm(2)
        self.fc = nn.Linear(2, 2)


def test_the_partial_spec_keeps_mixed_case_norms_deterministic(tmp_path):
    torch.save(MixedCaseNorms().state_dict(), tmp_path / "norms.pt")
    spec = read_spec(SAMPLES / "partial.yaml")
    result, _, _ = run(tmp_path / "norms.pt", tmp_path / "out", spec)
    assert [p.name for p in result.parameters] == ["conv1.weight", "fc.weight"]


def test_monte_carlo_is_recorded(models, tmp_path):
    result, _, report = run(
        models.path("mlp", "safetensors"), tmp_path, resolve_spec(None), mc_samples=4
    )
    assert (result.method, result.samples) == ("monte_carlo", 4)
    assert (read_report(report).method, read_report(report).samples) == ("monte_carlo", 4)
    result, _, _ = run(
        models.path("mlp", "safetensors"),
        tmp_path,
        resolve_spec(None, prior="scale_mixture"),
        name="mixture",
    )
    assert (result.method, result.samples) == ("monte_carlo", 16)


# ------------------------------------------------------------------ tied weights


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, index):
        return self.head(torch.relu(self.body(self.emb(index))))


def test_tied_weights_of_a_state_dict_are_reparametrized_once(tmp_path):
    net = TiedNet()
    torch.save(net.state_dict(), tmp_path / "tied.pt")
    result, checkpoint, report = run(tmp_path / "tied.pt", tmp_path / "out")
    assert [p.name for p in result.parameters] == ["emb.weight", "body.weight", "body.bias"]
    assert result.deterministic == []
    with Checkpoint(checkpoint) as ckpt:
        assert ckpt.parameters["emb.weight"].aliases == ["emb.weight", "head.weight"]
        assert not any(key.startswith("head.") for key in ckpt.files)
        bnn = ckpt.to_bayesian(TiedNet())
        assert bnn.reparametrized_names() == ["body.weight", "body.bias", "emb.weight"]
        assert bnn.module.head.weight is not None
        with torch.no_grad(), bnn.mean_weights():
            assert torch.equal(bnn.module.head.weight, bnn.module.emb.weight)
            assert torch.equal(bnn.module.emb.weight, net.emb.weight)
            assert bnn(torch.tensor([1, 2])).shape == (2, 6)
            kl = float(bnn.kl_divergence())
    expected = read_report(report)
    assert sum(expected.numels) == 6 * 4 + 4 * 4 + 4
    assert kl == pytest.approx(expected.total, rel=1e-5)


# ------------------------------------------------------------------------ errors


def test_arch_is_refused_for_program_files(models, tmp_path):
    spec = read_spec(SAMPLES / "state_dict_arch.yaml")
    for fmt in ("torchscript", "export"):
        with pytest.raises(SpecError, match="arch applies to state dicts"):
            run(models.path("mlp", fmt), tmp_path, spec)
    assert list(tmp_path.iterdir()) == []


def test_a_state_dict_not_matching_the_arch_is_refused(models, tmp_path):
    spec = read_spec(SAMPLES / "state_dict_arch.yaml")
    with pytest.raises(FormatError) as error:
        run(
            models.path("mlp", "state_dict"),
            tmp_path,
            spec,
            arch=spec.arch,
            arch_kwargs={"in_features": 8, "hidden": 32, "out_features": 1},
        )
    message = str(error.value)
    assert "missing: 1.bias" in message and "unexpected: 2.bias, 2.weight" in message
    assert "0.weight: file (8, 4) vs arch (32, 8)" in message
    assert list(tmp_path.iterdir()) == []


def test_an_include_matching_nothing_is_refused(models, tmp_path):
    spec = resolve_spec(None, include=["nothing*"])
    with pytest.raises(UsageError, match="no tensor to reparametrize") as error:
        run(models.path("mlp", "safetensors"), tmp_path, spec)
    assert "0.weight" in error.value.hint
    assert list(tmp_path.iterdir()) == []


def test_existing_outputs_are_kept_without_force(models, tmp_path):
    _, checkpoint, report = run(models.path("mlp", "safetensors"), tmp_path)
    before = checkpoint.read_bytes(), report.read_bytes()
    spec = resolve_spec(None, posterior="gaussian")
    with pytest.raises(OutputExistsError):
        run(models.path("mlp", "safetensors"), tmp_path, spec)
    assert (checkpoint.read_bytes(), report.read_bytes()) == before
    run(models.path("mlp", "safetensors"), tmp_path, spec, force=True)
    assert checkpoint.read_bytes() != before[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.name, report.name]


@pytest.mark.parametrize("shard_size", [None, 300])
def test_an_interrupted_conversion_leaves_no_file(models, tmp_path, monkeypatch, shard_size):
    calls = []
    original = safetensors_io.SafetensorsWriter.write

    def write(self, name, tensor):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(self, name, tensor)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        run(models.path("cnn", "safetensors"), tmp_path, shard_size=shard_size)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_default_output_paths():
    assert output_paths(Path("m/model.pt"), None, None) == (
        Path("model.bnn.safetensors"),
        Path("model.kl.safetensors"),
    )
    index = Path("m/model.safetensors.index.json")
    assert output_paths(index, None, None)[0] == Path("model.bnn.safetensors")
    assert output_paths(Path("a.pt"), Path("x/c.bnn"), Path("x/r.kl")) == (
        Path("x/c.bnn"),
        Path("x/r.kl"),
    )
    # A program's ending stays in the name: x.jit and x.pt2 do not collide.
    jit, pt2 = (output_paths(Path(f"x.{e}"), None, None)[0] for e in ("jit", "pt2"))
    assert (jit, pt2) == (Path("x.jit.bnn.safetensors"), Path("x.bnn.safetensors"))


def test_the_summary_adds_up(models, tmp_path):
    result, _, _ = run(models.path("lstm", "export"), tmp_path)
    assert result.kl_sum == pytest.approx(math.fsum(p.kl for p in result.parameters))
    assert result.kl_mean == pytest.approx(result.kl_sum / result.elements)
    assert all(p.kl > 0 and p.sigma_mean > 0 for p in result.parameters)
    assert result.source["format"] == "export"


# ------------------------------------------------------------------ bnnify.convert


def test_convert_takes_a_path_a_spec_document_and_overrides(models, tmp_path):
    seen = []
    result = bnnify.convert(
        models.path("mlp", "state_dict"),
        {"prior": {"name": "laplace", "kwargs": {"scale": 0.5}}, "seed": 3},
        output=tmp_path / "m.bnn.safetensors",
        prior_args={"mu": 0.1},
        posterior=("pretrained_gaussian", {"sigma": 0.05}),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert result.spec.prior == ("laplace", {"mu": 0.1, "scale": 0.5})
    assert result.spec.posterior == ("pretrained_gaussian", {"sigma": 0.05})
    assert result.spec.seed == 3 and result.method == "analytic"
    assert result.outputs == [tmp_path / "m.bnn.safetensors", tmp_path / "m.kl.safetensors"]
    total = seen[0][1]
    assert sum(done for done, _ in seen) == total and {t for _, t in seen} == {total}
    assert result.to_json()["kl"]["method"] == "analytic"


def test_an_in_memory_module_is_converted_unchanged(tmp_path):
    net = build_model().eval()
    before = copy.deepcopy(net.state_dict())
    result = bnnify.convert(net, output=tmp_path / "net.bnn.safetensors")
    assert result.source == {
        "name": "<Sequential>",
        "format": "module",
        "sha256": from_module(net).sha256,
    }
    assert all(isinstance(p, nn.Parameter) for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with Checkpoint(result.outputs[0]) as ckpt:
        assert ckpt.source["format"] == "module"
        with torch.no_grad():
            weights = ckpt.to_bayesian(build_model()).sample_parameters(mean=True)
    assert torch.equal(weights["0.weight"], net[0].weight)
    with pytest.raises(UsageError, match="no file name"):
        bnnify.convert(net)


def test_unknown_options_and_sizes_are_refused(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default outputs' folder is probed first
    with pytest.raises(ArgumentTypeError, match="unknown options"):
        bnnify.convert(models.path("mlp", "state_dict"), sigma=1.0)
    with pytest.raises(InvalidArgumentError, match="'2XB' is not a size"):
        bnnify.convert(models.path("mlp", "state_dict"), shard_size="2XB")
    assert list(tmp_path.iterdir()) == []


def test_outputs_onto_what_convert_reads_are_refused_even_with_force(tmp_path):
    torch.save(build_model().state_dict(), tmp_path / "m.pt")
    spec = tmp_path / "spec.yaml"
    spec.write_text("seed: 1\n")
    before = {path: path.read_bytes() for path in (tmp_path / "m.pt", spec)}
    for output, report in ((tmp_path / "m.pt", None), (tmp_path / "o.bnn.safetensors", spec)):
        with pytest.raises(UsageError, match="would overwrite the input"):
            bnnify.convert(tmp_path / "m.pt", spec, output=output, report=report, force=True)
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "spec.yaml"]


def test_an_arch_named_by_the_spec_runs_only_as_confirmed(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    code = f"from torch import nn\nopen({str(marker)!r}, 'w').close()\n"
    code += "def build(n):\n    return nn.Sequential(nn.Linear(2, n))\n"
    (tmp_path / "confirmed_arch.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(nn.Sequential(nn.Linear(2, 3)).state_dict(), tmp_path / "m.pt")
    spec = {"arch": "confirmed_arch:build", "arch_kwargs": {"n": 3}}
    out = tmp_path / "m.bnn.safetensors"
    for confirmation in (
        {},
        {"arch": "confirmed_arch:build"},
        {"arch": "confirmed_arch:build", "arch_kwargs": {"n": 4}},
    ):
        with pytest.raises(UnsafeInputError, match="confirmed_arch:build"):
            bnnify.convert(tmp_path / "m.pt", spec, output=out, **confirmation)
    assert not marker.exists() and not out.exists()
    result = bnnify.convert(
        tmp_path / "m.pt", spec, output=out, arch="confirmed_arch:build", arch_kwargs='{"n": 3}'
    )
    assert marker.exists() and {p.name for p in result.parameters} == {"0.weight", "0.bias"}


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 2**20), ("2GB", 2 * 10**9), ("500 MiB", 500 * 2**20), ("1kb", 1000), (7, 7)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0.5B", "0", "-1KB", "GB", "1e400", "nan", True])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(InvalidArgumentError, match="is not a size"):
        parse_size(text)
