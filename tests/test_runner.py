"""Tests of bnnify.usecases.runner: the TorchScript gradient bridge, runners, input checks."""

from __future__ import annotations

import pytest
import torch
from fit_files import convert_file, save_program, save_script
from torch import nn
from torch.func import functional_call

import bnnify
from bnnify.demo import build_model
from bnnify.errors import InputError, UnsafeInputError, UsageError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.model_files import from_module, load_model
from bnnify.usecases.runner import ModuleRunner, ScriptRunner, check_input, open_runner

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


class Tied(nn.Module):
    """Two layers sharing one weight matrix (the second uses it again after a tanh)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def script_runner(folder, net, name):
    """Saves `net` as TorchScript, converts it, and opens a runner on it."""
    model = save_script(net.eval(), folder / f"{name}.pt")
    ckpt = convert_file(model, folder / f"{name}.bnn.safetensors")
    with Checkpoint(ckpt) as checkpoint:
        return open_runner(load_model(model), checkpoint)


def loss_of(output: torch.Tensor) -> torch.Tensor:
    return (output.square() * torch.arange(1.0, 1.0 + output.shape[1])).sum()


def grads(runner):
    store = runner.bnn.variational[0]
    return store.mu.grad.clone(), store.rho.grad.clone()


def clear(runner):
    store = runner.bnn.variational[0]
    store.mu.grad = store.rho.grad = None


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("build", [mlp, Tied], ids=["mlp", "tied"])
@pytest.mark.parametrize("passes", [1, 3])
def test_script_gradients_equal_the_in_place_module_path(tmp_path, dtype, tol, build, passes):
    net = build().to(dtype)
    runner = script_runner(tmp_path, net, "net")
    assert isinstance(runner, ScriptRunner)
    x = torch.randn(5, 3 if build is mlp else 4, dtype=dtype)

    torch.manual_seed(11)
    loss = sum(loss_of(runner(x)) for _ in range(passes))  # several MC samples, one backward
    loss.backward()
    script_mu, script_rho = grads(runner)
    clear(runner)

    torch.manual_seed(11)
    reference = 0
    for _ in range(passes):
        weights = runner.bnn.sample_parameters()
        reference = reference + loss_of(functional_call(net, weights, (x,)))
    reference.backward()
    module_mu, module_rho = grads(runner)

    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=tol)
    assert script_mu.abs().sum() > 0 and script_rho.abs().sum() > 0
    scale = module_mu.abs().max()
    assert torch.allclose(script_mu, module_mu, rtol=0, atol=tol * scale)
    assert torch.allclose(script_rho, module_rho, rtol=0, atol=tol * module_rho.abs().max())


def test_tied_weights_share_one_sample_in_the_script(tmp_path):
    net = Tied().double()
    runner = script_runner(tmp_path, net, "tied")
    assert runner.names == ["a.weight", "a.bias", "b.bias", "head.weight", "head.bias"]
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.manual_seed(5)
    loss_of(runner(x)).backward()
    tied_mu, _ = grads(runner)
    script = runner.script
    assert script.a.weight.data_ptr() == script.b.weight.data_ptr()
    assert not torch.equal(script.a.weight, net.a.weight)  # a sample, not the trained weight
    clear(runner)
    # Were b.weight left at its trained value, the gradient of a.weight would differ.
    torch.manual_seed(5)
    weights = runner.bnn.sample_parameters()
    weights["b.weight"] = net.b.weight.detach().clone()
    loss_of(functional_call(net, weights, (x,), tie_weights=False)).backward()
    untied_mu, _ = grads(runner)
    assert not torch.allclose(tied_mu, untied_mu, atol=1e-6)


def test_only_the_posterior_is_a_parameter_of_the_script_runner(tmp_path):
    runner = script_runner(tmp_path, mlp(), "mlp")
    names = [name for name, _ in runner.named_parameters()]
    assert names == ["bnn.variational.0.mu", "bnn.variational.0.rho"]


def test_script_runner_without_grad_and_mean_forward(tmp_path):
    net = mlp()
    runner = script_runner(tmp_path, net, "mlp")
    x = torch.randn(4, 3)
    with torch.no_grad():
        torch.manual_seed(2)
        first = runner(x)
        torch.manual_seed(2)
        again = runner(x)
        other = runner(x)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # The default posterior's means are the trained weights.
    assert torch.allclose(runner.mean_forward(x), net(x), atol=1e-6)
    samples = runner.predict_samples(x, 6)
    assert samples.shape == (6, 4, 2)
    assert samples.std(0).min() > 0


def test_runners_cast_float64_data_to_the_model_dtype(tmp_path):
    net = mlp()
    runner = script_runner(tmp_path, net, "mlp")
    x = torch.randn(4, 3, dtype=torch.float64)
    output = check_input(runner, x)
    assert output.dtype == torch.float32
    assert torch.allclose(output, net(x[:2].float()), atol=1e-6)
    cast = runner.cast_inputs({"x": torch.arange(3), "w": torch.ones(3, dtype=torch.float64)})
    assert cast.tensors["x"].dtype == torch.int64  # indices stay integers
    assert cast.tensors["w"].dtype == torch.float32


def test_export_program_runs_in_place(tmp_path):
    net = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.randn(10, 2)
    model = save_program(net, x, tmp_path / "net.pt2")
    ckpt = convert_file(model, tmp_path / "net.bnn.safetensors")
    with Checkpoint(ckpt) as checkpoint:
        runner = open_runner(load_model(model), checkpoint)
    assert isinstance(runner, ModuleRunner)
    assert torch.allclose(runner.mean_forward(x), net(x), atol=1e-6)
    assert runner.predict_samples(x, 4).shape == (4, 10, 3)
    runner(x).sum().backward()
    assert runner.bnn.variational[0].mu.grad.abs().sum() > 0


def test_arch_state_dict_runs_with_batchnorm_statistics(tmp_path):
    with torch.no_grad():
        net = build_model().train()
        net(torch.randn(32, 8) * 3 + 1)  # running statistics off their defaults
    net.eval()
    torch.save(net.state_dict(), tmp_path / "demo.pt")
    from bnnify.formats.spec import resolve_spec

    spec = resolve_spec("sample_configs/state_dict_arch.yaml")
    ckpt = convert_file(tmp_path / "demo.pt", tmp_path / "demo.bnn.safetensors", spec=spec)
    with Checkpoint(ckpt) as checkpoint:
        runner = open_runner(
            load_model(tmp_path / "demo.pt"),
            checkpoint,
            arch=spec.arch,
            arch_kwargs=spec.arch_kwargs,
        )
    x = torch.randn(5, 8)
    assert isinstance(runner, ModuleRunner)
    assert torch.allclose(runner.mean_forward(x), net(x), atol=1e-5)


def test_a_recorded_arch_runs_only_when_the_caller_confirms_it(tmp_path):
    torch.save(build_model().state_dict(), tmp_path / "demo.pt")
    from bnnify.formats.spec import resolve_spec

    spec = resolve_spec("sample_configs/state_dict_arch.yaml")
    ckpt = convert_file(tmp_path / "demo.pt", tmp_path / "demo.bnn.safetensors", spec=spec)
    model = load_model(tmp_path / "demo.pt")
    with Checkpoint(ckpt) as checkpoint:
        with pytest.raises(UnsafeInputError) as error:
            open_runner(model, checkpoint)
        assert spec.arch in error.value.message and "--arch" in error.value.hint
        with pytest.raises(UnsafeInputError, match="--arch confirms 'os:system'"):
            open_runner(model, checkpoint, arch="os:system")
        # The name alone does not confirm the recorded keyword arguments.
        with pytest.raises(UnsafeInputError, match="--arch-kwargs must repeat") as error:
            open_runner(model, checkpoint, arch=spec.arch)
        assert '--arch-kwargs \'{"hidden": 32' in error.value.hint
        with pytest.raises(UnsafeInputError, match="--arch-kwargs gives"):
            open_runner(model, checkpoint, arch=spec.arch, arch_kwargs='{"hidden": 64}')
        assert open_runner(model, checkpoint, arch=spec.arch, arch_kwargs=spec.arch_kwargs)


def test_a_state_dict_without_arch_cannot_run(tmp_path):
    torch.save(mlp().state_dict(), tmp_path / "w.pt")
    ckpt = convert_file(tmp_path / "w.pt", tmp_path / "w.bnn.safetensors")
    with Checkpoint(ckpt) as checkpoint, pytest.raises(UsageError) as error:
        open_runner(load_model(tmp_path / "w.pt"), checkpoint)
    assert "without an architecture" in error.value.message
    assert "arch" in error.value.hint and "TorchScript" in error.value.hint


def test_another_model_file_is_refused_by_its_sha256(tmp_path):
    runner_files = [save_script(mlp().eval(), tmp_path / f"{name}.pt") for name in "ab"]
    ckpt = convert_file(runner_files[0], tmp_path / "a.bnn.safetensors")
    with Checkpoint(ckpt) as checkpoint, pytest.raises(InputError, match="sha256") as error:
        open_runner(load_model(runner_files[1]), checkpoint)
    assert "'a.pt'" in error.value.message
    assert "same model file" in error.value.hint


def test_inputs_of_the_wrong_shape_name_the_shape(tmp_path):
    runner = script_runner(tmp_path, mlp(), "mlp")
    with pytest.raises(InputError, match=r"inputs of shape \(5,\) per example, dtype float32"):
        check_input(runner, torch.randn(4, 5))


# ------------------------------------- the reach check of the in-place runner


def module_runner(folder, net, name):
    ckpt = bnnify.convert(net, output=folder / f"{name}.bnn.safetensors").outputs[0]
    with Checkpoint(ckpt) as checkpoint:
        return open_runner(from_module(net), checkpoint)


@pytest.mark.parametrize("call", ["forward", "predict_samples", "mean_forward", "check_input"])
def test_a_module_reading_a_cached_copy_of_a_weight_is_refused(tmp_path, call):
    from multi_input_models import CachedWeight

    runner = module_runner(tmp_path, CachedWeight(cached=True), "cached")
    assert isinstance(runner, ModuleRunner)
    x = torch.randn(4, 3)
    run = {
        "forward": lambda: runner(x),
        "predict_samples": lambda: runner.predict_samples(x, 3),
        "mean_forward": lambda: runner.mean_forward(x),
        "check_input": lambda: check_input(runner, x),
    }[call]
    message = r"does not depend on the Bayesian parameter\(s\) 'lin.weight'"
    with pytest.raises(InputError, match=message) as error:
        run()
    assert "--exclude 'lin.weight'" in error.value.hint and "__init__" in error.value.hint


def test_a_module_reading_its_weight_passes_the_check_once_and_samples(tmp_path):
    from multi_input_models import CachedWeight

    runner = module_runner(tmp_path, CachedWeight(cached=False), "read")
    x = torch.randn(4, 3)
    torch.manual_seed(3)
    first = runner.predict_samples(x, 50)  # checks, once
    assert first.std(0).min() > 0
    torch.manual_seed(3)
    # The check drew no random numbers: the same seed gives the same samples without it.
    assert torch.equal(runner.predict_samples(x, 50), first)


def test_several_inputs_are_batched_together_and_constants_pass_unchanged(tmp_path):
    from multi_input_models import MaskedRegressor

    net = MaskedRegressor().eval()
    runner = module_runner(tmp_path, net, "masked")
    x, mask = torch.randn(11, 3), (torch.rand(11, 1) > 0.5).float()
    means = runner.predict_batches({"x": x, "mask": mask}, 1, batch_size=4, mean=True)
    with torch.no_grad():
        assert torch.allclose(means[0], net(x, mask), atol=1e-6)
    samples = runner.predict_batches({"mask": mask, "x": x}, 5, batch_size=4)
    assert samples.shape == (5, 11, 1)
    estimator = runner.estimator({"x": x, "mask": mask})
    assert estimator.estimator.value == "weight_sampling"
    assert estimator.reason == "the model is given 2 inputs, not one tensor"


@pytest.mark.parametrize("kind", ["script", "module"])
def test_a_model_that_keeps_state_between_calls_is_refused(tmp_path, kind):
    from multi_input_models import Streaming

    net = Streaming().eval()
    if kind == "script":
        runner = script_runner(tmp_path, net, "streaming")
    else:
        runner = module_runner(tmp_path, net, "streaming")
    with pytest.raises(InputError, match="keeps state between calls"):
        check_input(runner, torch.randn(4, 3))


@pytest.mark.parametrize("call", ["predict_samples", "forward"])
@pytest.mark.parametrize("kind", ["script", "module"])
def test_a_model_returning_several_tensors_is_refused_by_name(tmp_path, kind, call):
    from multi_input_models import TwoHeads

    runner = (script_runner if kind == "script" else module_runner)(tmp_path, TwoHeads(), "heads")
    x = torch.randn(4, 3)
    message = r"returns a tuple of 2 \(tensor \(2, 4\), tensor \(2, 2\)\), not one tensor"
    with pytest.raises(InputError, match=message):
        runner.predict_samples(x, 2) if call == "predict_samples" else runner(x)
