"""Tests of bnnify.formats.checkpoint: the self-describing variational checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_files import build_cnn, build_mlp, shared_files
from safetensors.torch import save_file as plain_save_file

import bnnify
from bnnify.errors import FormatError, InputError, UnsafeInputError
from bnnify.formats.checkpoint import FORMAT, FORMAT_VERSION, Checkpoint
from bnnify.formats.model_files import load_model, sha256_file
from bnnify.formats.report import read_report
from bnnify.formats.safetensors_io import load_file, read_header, save_file
from bnnify.formats.spec import ConversionSpec, resolve_spec
from bnnify.usecases.convert import convert


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return shared_files(tmp_path_factory)


def make(models, folder, model="cnn", fmt="state_dict", **spec_args):
    shard_size = spec_args.pop("shard_size", None)
    spec = resolve_spec(None, **spec_args)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, report = folder / "c.bnn.safetensors", folder / "c.kl.safetensors"
    with load_model(models.path(model, fmt)) as loaded:
        result = convert(loaded, spec, output=checkpoint, report=report, shard_size=shard_size)
    return spec, result.outputs[-2], report


@pytest.fixture(scope="module")
def empirical(models, tmp_path_factory):
    """A CNN checkpoint with an empirical prior (prior tensors in the file)."""
    return make(models, tmp_path_factory.mktemp("empirical"), prior="empirical_gaussian")


def test_the_metadata_describes_the_checkpoint(models, empirical):
    spec, path, _ = empirical
    source = models.path("cnn", "state_dict")
    with Checkpoint(path) as ckpt:
        assert ckpt.metadata["bnnify.format"] == FORMAT == "bnnify.variational"
        assert ckpt.metadata["bnnify.format_version"] == FORMAT_VERSION == "1"
        assert ckpt.metadata["bnnify.version"] == bnnify.__version__
        assert ckpt.metadata["torch.version"] == torch.__version__
        assert ckpt.source == {
            "name": source.name,
            "format": "state_dict",
            "sha256": sha256_file(source),
        }
        assert ckpt.spec == spec
        assert ckpt.fit is None
        module = models.modules["cnn"]
        params = dict(module.named_parameters())
        assert list(ckpt.parameters) == list(params)
        for name, record in ckpt.parameters.items():
            assert record.shape == list(params[name].shape)
            assert record.dtype == "float32"
            assert record.tensors == {"mu": f"{name}.mu", "rho": f"{name}.rho"}
            assert record.prior_tensors == {"mu": f"{name}.prior.mu"}
            assert record.aliases == [name]
        assert {n: (r.kind, r.dtype) for n, r in ckpt.deterministic.items()} == {
            "1.running_mean": ("unknown", "float32"),
            "1.running_var": ("unknown", "float32"),
            "1.num_batches_tracked": ("unknown", "int64"),
        }
        assert ckpt.num_elements() == sum(p.numel() for p in params.values())
        assert sorted(ckpt.keys()) == sorted(
            [f"{n}.{role}" for n in params for role in ("mu", "rho", "prior.mu")]
            + list(ckpt.deterministic)
        )


def test_the_documented_layout_rebuilds_the_posterior(models, empirical):
    """docs/format.md: sigma = softplus(rho), prior.mu = the weights, buffers unchanged."""
    _, path, _ = empirical
    tensors = load_file(path)
    module = models.modules["cnn"]
    for name, weight in module.named_parameters():
        sigma = F.softplus(tensors[f"{name}.rho"])
        assert torch.equal(tensors[f"{name}.mu"], weight)
        assert torch.equal(tensors[f"{name}.prior.mu"], weight)
        # The default posterior: sigma = 0.1 |w|, floored at min_sigma.
        expected = (0.1 * weight.abs()).clamp_min(1e-6)
        torch.testing.assert_close(sigma, expected, rtol=1e-4, atol=1e-7)
    for name, buffer in module.named_buffers():
        assert torch.equal(tensors[name], buffer)
    with Checkpoint(path) as ckpt:
        state = ckpt.variational_state()
        assert sorted(state) == sorted(k for k in tensors if k not in ckpt.deterministic)
        for key, tensor in state.items():
            assert torch.equal(tensor, tensors[key])


def test_to_bayesian_loads_every_tensor(models, empirical):
    _, path, report = empirical
    with Checkpoint(path) as ckpt:
        bnn = ckpt.to_bayesian(build_cnn())
        state = bnn.variational_state()
        for key, tensor in ckpt.variational_state().items():
            assert torch.equal(state[key], tensor)
        assert torch.equal(bnn.module[1].running_mean, models.modules["cnn"][1].running_mean)
        with torch.no_grad():
            assert float(bnn.kl_divergence()) == pytest.approx(read_report(report).total, rel=1e-5)
        # A replacement prior drops the recorded prior tensors.
        other = ckpt.to_bayesian(prior=("gaussian", {"sigma": 0.5}))
        assert not any(".prior." in key for key in other.variational_state())
        with torch.no_grad():
            assert float(other.kl_divergence()) != pytest.approx(read_report(report).total)


def test_to_bayesian_refuses_another_architecture(empirical):
    _, path, _ = empirical
    with Checkpoint(path) as ckpt, pytest.raises(FormatError):
        ckpt.to_bayesian(build_mlp())


def test_a_sharded_checkpoint_reads_like_one_file(models, tmp_path):
    _, single, _ = make(models, tmp_path / "one", prior="laplace")
    _, index, _ = make(models, tmp_path / "many", prior="laplace", shard_size=400)
    assert index.name == "c.bnn.safetensors.index.json"
    with Checkpoint(single) as one, Checkpoint(index) as many:
        assert len(set(many.files.values())) > 1
        assert many.metadata["total_size"]
        assert many.parameters == one.parameters
        for key in one.files:
            assert torch.equal(many.tensor(key), one.tensor(key))
    for shard in set(Checkpoint(index).files.values()):
        with pytest.raises(FormatError, match="not in the file") as error:
            Checkpoint(shard)  # a shard holds only part of the tensors its metadata names
        assert "index.json" in error.value.hint


def test_an_unknown_format_version_is_refused(empirical, tmp_path):
    _, path, _ = empirical
    metadata, _ = read_header(path)
    metadata["bnnify.format_version"] = "99"
    save_file(load_file(path), tmp_path / "future.safetensors", metadata)
    with pytest.raises(FormatError) as error:
        Checkpoint(tmp_path / "future.safetensors")
    assert "format version '99' is not supported" in str(error.value)
    assert "supported: 1" in str(error.value)
    assert error.value.hint


def test_files_that_are_not_checkpoints_are_refused(tmp_path, empirical):
    plain_save_file({"weight": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FormatError, match=r"not a bnnify checkpoint.*without bnnify metadata"):
        Checkpoint(tmp_path / "plain.safetensors")
    _, _, report = empirical
    with pytest.raises(FormatError, match=r"'bnnify\.kl_report'"):
        Checkpoint(report)
    (tmp_path / "text.safetensors").write_text("not a checkpoint")
    with pytest.raises(FormatError):
        Checkpoint(tmp_path / "text.safetensors")
    with pytest.raises(InputError, match="does not exist"):
        Checkpoint(tmp_path / "missing.safetensors")


def test_malformed_metadata_is_a_format_error(empirical, tmp_path):
    _, path, _ = empirical
    metadata, _ = read_header(path)
    tensors = load_file(path)
    for key, value in (("bnnify.spec", "{not json"), ("bnnify.parameters", "[1, 2]")):
        broken = {**metadata, key: value}
        save_file(tensors, tmp_path / "broken.safetensors", broken)
        with pytest.raises(FormatError, match="malformed bnnify metadata"):
            Checkpoint(tmp_path / "broken.safetensors")


def test_broken_sharded_checkpoints_are_refused(models, tmp_path):
    _, index, _ = make(models, tmp_path, shard_size=400)
    shard = sorted(tmp_path.glob("c.bnn-*.safetensors"))[0]
    shard.rename(tmp_path / "moved")
    with pytest.raises(InputError, match="does not exist"):
        Checkpoint(index)
    shard.with_name("moved").rename(shard)
    text = index.read_text()
    index.write_text(text.replace(shard.name, "../" + shard.name))
    with pytest.raises(UnsafeInputError, match="outside its folder"):
        Checkpoint(index)
    index.write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(FormatError, match=r"not a sharded checkpoint.s index"):
        Checkpoint(index)


def test_an_unknown_tensor_key_is_a_format_error(empirical):
    _, path, _ = empirical
    with Checkpoint(path) as ckpt, pytest.raises(FormatError, match="no tensor 'nope'"):
        ckpt.tensor("nope")


def test_the_spec_is_recorded_even_for_devices_missing_here(empirical, tmp_path):
    _, path, _ = empirical
    metadata, _ = read_header(path)
    spec = json.loads(metadata["bnnify.spec"])
    spec["device"] = "cuda:3"
    save_file(
        load_file(path), tmp_path / "gpu.safetensors", {**metadata, "bnnify.spec": json.dumps(spec)}
    )
    with Checkpoint(tmp_path / "gpu.safetensors") as ckpt:
        assert ckpt.spec.device == "cuda:3"
        assert ckpt.spec == ConversionSpec.from_json(spec, recorded=True)


# ---------------------------------------------------------------------------- fuzzing

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
VALUES = st.sampled_from([0.0, -1.0, 1e30, -1e4, float("nan"), float("inf"), 3e38])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A two-parameter checkpoint with an empirical prior: its file's metadata and tensors."""
    folder = tmp_path_factory.mktemp("small")
    save_file({"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}, folder / "m.safetensors")
    with load_model(folder / "m.safetensors") as loaded:
        spec = resolve_spec(None, prior="empirical_gaussian")
        convert(loaded, spec, output=folder / "c.safetensors", report=folder / "r.safetensors")
    metadata, _ = read_header(folder / "c.safetensors")
    return metadata, load_file(folder / "c.safetensors"), (folder / "c.safetensors").read_bytes()


def check_opening(path) -> None:
    """Opening refuses with a bnnify error, or every KL it then gives is finite and >= 0."""
    from bnnify.errors import BnnifyError
    from bnnify.usecases.checkpoint_kl import checkpoint_kl
    from bnnify.usecases.parameter_stats import parameter_stats

    try:
        with Checkpoint(path) as ckpt:
            report = checkpoint_kl(ckpt)
            parameter_stats(ckpt)
    except BnnifyError:
        return
    assert all(math.isfinite(v) and v >= 0 for v in report.per_parameter)


@FUZZ
@given(
    key=st.sampled_from(["fc.weight.mu", "fc.weight.rho", "fc.bias.rho", "fc.weight.prior.mu"]),
    shape=st.sampled_from([(3, 2), (2, 3), (6,), (3,), ()]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int32]),
    value=VALUES,
)
def test_fuzz_checkpoints_with_tensors_replaced(small, tmp_path, key, shape, dtype, value):
    metadata, tensors, _ = small
    tensor = (
        torch.full(shape, value).to(dtype)
        if dtype.is_floating_point
        else torch.zeros(shape, dtype=dtype)
    )
    save_file({**tensors, key: tensor}, tmp_path / "c.safetensors", metadata)
    check_opening(tmp_path / "c.safetensors")


@FUZZ
@given(
    key=st.sampled_from(
        ["bnnify.parameters", "bnnify.deterministic", "bnnify.spec", "bnnify.source", "bnnify.fit"]
    ),
    value=JSON,
    nested=st.booleans(),
)
def test_fuzz_checkpoints_with_metadata_replaced(small, tmp_path, key, value, nested):
    metadata, tensors, _ = small
    if nested and key == "bnnify.parameters":
        records = json.loads(metadata[key])
        records["fc.weight"][
            ["shape", "dtype", "tensors", "prior_tensors"][len(str(value)) % 4]
        ] = value
        value = records
    save_file(tensors, tmp_path / "c.safetensors", {**metadata, key: json.dumps(value)})
    check_opening(tmp_path / "c.safetensors")


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 255)), min_size=1, max_size=3))
def test_fuzz_checkpoint_bytes(small, tmp_path, edits):
    data = bytearray(small[2])
    for position, value in edits:
        data[position % len(data)] = value
    (tmp_path / "c.safetensors").write_bytes(bytes(data))
    check_opening(tmp_path / "c.safetensors")
