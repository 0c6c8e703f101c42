"""Tests of bnnify.usecases.script_weights: every sampled weight reaches a TorchScript model.

Each recurrent module type runs as TorchScript (`ScriptRunner`) and as the same
`nn.Module` reparametrized in place (`ModuleRunner`, the state dict + `arch` path) with
one checkpoint: the samples, the spread and the gradients with respect to `mu` and
`rho` must agree. Models that keep a parameter where a sample cannot go are refused.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from fit_files import cli, convert_file, save_script, single_thread
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.func import functional_call

from bnnify.bnn.likelihood import GaussianLikelihood
from bnnify.errors import InputError
from bnnify.formats.checkpoint import Checkpoint
from bnnify.formats.data import Dataset
from bnnify.formats.model_files import load_model
from bnnify.usecases.runner import ModuleRunner, ScriptRunner, open_runner
from bnnify.usecases.training import FitSettings, train

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


class Sequence(nn.Module):
    """An `nn.LSTM`, `nn.GRU` or `nn.RNN` over `(batch, time, features)`, outputs flattened."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        self.batch_first: bool = rnn.batch_first

    def forward(self, x: Tensor) -> Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        out = self.rnn(x)[0]
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out.flatten(1)


class CellLoop(nn.Module):
    """An `nn.GRUCell` or `nn.RNNCell` unrolled over time."""

    def __init__(self, cell: nn.Module):
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor) -> Tensor:
        h = self.cell(x[:, 0])
        outputs = [h]
        for t in range(1, x.shape[1]):
            h = self.cell(x[:, t], h)
            outputs.append(h)
        return torch.cat(outputs, 1)


class LSTMCellLoop(nn.Module):
    """An `nn.LSTMCell` unrolled over time."""

    def __init__(self, cell: nn.LSTMCell):
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor) -> Tensor:
        h, c = self.cell(x[:, 0])
        outputs = [h]
        for t in range(1, x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            outputs.append(h)
        return torch.cat(outputs, 1)


MODELS = {
    "lstm": lambda: Sequence(
        nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True, proj_size=2)
    ),
    "lstm-time-first": lambda: Sequence(nn.LSTM(3, 4)),
    "gru": lambda: Sequence(nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True)),
    "rnn-relu": lambda: Sequence(nn.RNN(3, 4, num_layers=2, nonlinearity="relu", dropout=0.5)),
    "rnn-no-bias": lambda: Sequence(nn.RNN(3, 4, bias=False, bidirectional=True)),
    "lstm-cell": lambda: LSTMCellLoop(nn.LSTMCell(3, 4)),
    "gru-cell": lambda: CellLoop(nn.GRUCell(3, 4)),
    "rnn-cell": lambda: CellLoop(nn.RNNCell(3, 4, nonlinearity="relu")),
}


def save_traced(net: nn.Module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(net, torch.zeros(2, 6, 3, dtype=torch.float64)), str(path))
    return path


def both_runners(tmp_path, net: nn.Module, save=save_script, **flags):
    """The TorchScript runner and the in-place runner of `net`, with one checkpoint."""
    model = save(net, tmp_path / "net.pt")
    ckpt = convert_file(model, tmp_path / "net.bnn.safetensors", **flags)
    with Checkpoint(ckpt) as checkpoint:
        script = open_runner(load_model(model), checkpoint)
        module = ModuleRunner(copy.deepcopy(net), checkpoint, "cpu")
    assert isinstance(script, ScriptRunner)
    return script, module


def inputs(seed: int = 0) -> Tensor:
    return torch.randn(5, 6, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grads(runner) -> tuple[Tensor, Tensor]:
    store = runner.bnn.variational[0]
    return store.mu.grad.clone(), store.rho.grad.clone()


def assert_close(a: Tensor, b: Tensor, rel: float = 1e-10) -> None:
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=0, atol=rel * float(b.abs().max())), float((a - b).abs().max())


CASES = [(name, save_script) for name in MODELS] + [
    (name, save_traced) for name in ("lstm", "gru", "lstm-cell")
]


@pytest.mark.parametrize(
    ("name", "save"), CASES, ids=[f"{n}-{s.__name__.removeprefix('save_')}" for n, s in CASES]
)
def test_samples_spread_and_gradients_equal_the_in_place_module(tmp_path, name, save):
    net = MODELS[name]().double().eval()
    script, module = both_runners(tmp_path, net, save)
    x = inputs()
    torch.manual_seed(3)
    script_samples = script.predict_samples(x, 8)
    torch.manual_seed(3)
    module_samples = module.predict_samples(x, 8)
    # Every Bayesian parameter belongs to the recurrent layer: without its samples the
    # script's spread would be exactly zero (some ReLU units are, in both runners).
    spread = script_samples.std(0)
    assert spread.max() > 0
    assert_close(script_samples, module_samples)
    assert_close(spread, module_samples.std(0))
    assert_close(script.mean_forward(x), net(x))

    weights = torch.linspace(0.5, 2.0, spread.shape[1], dtype=torch.float64)
    for runner in (script, module):
        torch.manual_seed(4)
        loss = sum((runner(x).square() * weights).sum() for _ in range(2))
        loss.backward()
    script_mu, script_rho = grads(script)
    module_mu, module_rho = grads(module)
    assert module_mu.abs().max() > 0 and module_rho.abs().max() > 0
    assert_close(script_mu, module_mu)
    assert_close(script_rho, module_rho)


def test_fit_trains_the_lstm_as_the_in_place_module_does(tmp_path):
    torch.manual_seed(0)
    net = MODELS["lstm"]().double().eval()
    script, module = both_runners(tmp_path, net)
    x = inputs(1).repeat(4, 1, 1)
    data = Dataset(x, torch.sin(net(x).detach() * 3), "toy")
    # No KL term: only the likelihood moves the posterior, through the sampled weights.
    settings = FitSettings(task="regression", epochs=2, lr=0.01, batch_size=10, kl_weight=0.0)
    before = {k: v.clone() for k, v in script.bnn.variational_state().items()}
    for runner in (script, module):
        train(runner, GaussianLikelihood().double(), data, settings)
    after = script.bnn.variational_state()
    for name in script.names:
        for role in ("mu", "rho"):
            key = f"{name}.{role}"
            assert not torch.allclose(after[key], before[key], rtol=0, atol=1e-4), key
            assert_close(after[key], module.bnn.variational_state()[key], 1e-8)


class AliasedBuffer(nn.Module):
    """Reads its weight from a buffer sharing the parameter's memory (until `.to()`)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2, dtype=torch.float64)
        self.register_buffer("cache", self.lin.weight.detach())

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.cache, self.lin.bias)


class AliasedList(nn.Module):
    """Reads its weights from a list attribute holding the parameters, as `nn.LSTM` does."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2, dtype=torch.float64)
        self.weights = [self.lin.weight, self.lin.bias]

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weights[0], self.weights[1])


@pytest.mark.parametrize("build", [AliasedBuffer, AliasedList])
def test_weights_read_through_a_shared_alias_are_sampled(tmp_path, build):
    net = build().eval()
    model = save_script(net, tmp_path / "net.pt")
    ckpt = convert_file(model, tmp_path / "net.bnn.safetensors")
    with Checkpoint(ckpt) as checkpoint:
        runner = open_runner(load_model(model), checkpoint)
    assert runner.names == ["lin.weight", "lin.bias"]
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.manual_seed(1)
    runner(x).square().sum().backward()
    script_mu, _ = grads(runner)
    runner.bnn.variational[0].mu.grad = None
    torch.manual_seed(1)
    weights = {k.removeprefix("lin."): v for k, v in runner.bnn.sample_parameters().items()}
    functional_call(net.lin, weights, (x,)).square().sum().backward()
    assert_close(script_mu, grads(runner)[0])
    assert runner.predict_samples(x, 4).std(0).min() > 0


class Copied(nn.Module):
    """Reads a copy of its weight made when it was built."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("cache", self.lin.weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.cache, self.lin.bias)


class Transposed(nn.Module):
    """Reads a transposed view of its weight made when it was built."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("cache", self.lin.weight.detach().t())

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.cache + self.lin.bias


@pytest.mark.parametrize(
    ("build", "what"), [(Copied, "a copy of it"), (Transposed, "a view of it")]
)
def test_a_copy_or_a_view_of_a_parameter_is_refused_when_opened(tmp_path, build, what):
    model = save_script(build().eval(), tmp_path / "net.pt")
    ckpt = convert_file(model, tmp_path / "net.bnn.safetensors")
    with Checkpoint(ckpt) as checkpoint, pytest.raises(InputError) as error:
        open_runner(load_model(model), checkpoint)
    message = error.value.message
    assert "'lin.weight'" in message and "'cache'" in message and what in message
    assert ".pt2" in error.value.hint and "arch" in error.value.hint
    assert "--exclude 'lin.weight'" in error.value.hint


@torch.jit.interface
class LayerInterface(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        pass


class BehindAnInterface(nn.Module):
    """Calls `Copied` through an interface type, whose reads the inlined graph cannot show."""

    def __init__(self):
        super().__init__()
        self.layer = Copied()

    def forward(self, x: Tensor) -> Tensor:
        return self.layer.forward(x)


# The class itself, not the string that `from __future__ import annotations` leaves.
BehindAnInterface.__annotations__ = {"layer": LayerInterface}


def test_a_copy_behind_an_interface_call_is_refused(tmp_path):
    model = save_script(BehindAnInterface().eval(), tmp_path / "net.pt")
    ckpt = convert_file(model, tmp_path / "net.bnn.safetensors")
    with Checkpoint(ckpt) as checkpoint, pytest.raises(InputError, match=r"'layer\.cache', a copy"):
        open_runner(load_model(model), checkpoint)


class SpareCopy(nn.Module):
    """Keeps a copy of its weight that `forward` never reads (say, a moving average)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("average", self.lin.weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


def test_a_copy_that_forward_does_not_read_is_allowed(tmp_path):
    model = save_script(SpareCopy().eval(), tmp_path / "net.pt")
    ckpt = convert_file(model, tmp_path / "net.bnn.safetensors")
    with Checkpoint(ckpt) as checkpoint:
        runner = open_runner(load_model(model), checkpoint)
    assert runner.predict_samples(torch.randn(4, 3), 3).std(0).min() > 0


class Doubled(nn.Module):
    """Reads a tensor computed from its weight when it was built."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("doubled", self.lin.weight.detach() * 2)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.doubled / 2, self.lin.bias)


class Unused(nn.Module):
    """Has a layer that `forward` never calls."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.spare = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


@pytest.mark.parametrize("call", ["forward", "predict_samples", "mean_forward"])
@pytest.mark.parametrize(
    ("build", "unreached", "exclude"),
    [(Doubled, "lin.weight", "lin.weight"), (Unused, "spare.weight", "spare.*")],
)
def test_a_parameter_that_does_not_reach_the_output_is_refused(
    tmp_path, build, unreached, exclude, call
):
    model = save_script(build().eval(), tmp_path / "net.pt")
    ckpt = convert_file(model, tmp_path / "net.bnn.safetensors")
    with Checkpoint(ckpt) as checkpoint:
        runner = open_runner(load_model(model), checkpoint)
    x = torch.randn(4, 3)
    run = {
        "forward": lambda: runner(x),
        "predict_samples": lambda: runner.predict_samples(x, 3),
        "mean_forward": lambda: runner.mean_forward(x),
    }[call]
    with pytest.raises(InputError) as error:
        run()
    assert f"'{unreached}'" in error.value.message
    assert "does not depend" in error.value.message
    # The whole unused layer (weight and bias), in one pattern.
    assert error.value.hint.endswith(f"--exclude '{exclude}'.")
    with pytest.raises(InputError):  # every pass until the model is fixed
        run()


class Labels(nn.Module):
    """Returns class indices: nothing shows whether the weights reach them."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).argmax(1)


def test_an_output_without_gradient_is_refused(tmp_path):
    model = save_script(Labels().eval(), tmp_path / "net.pt")
    ckpt = convert_file(model, tmp_path / "net.bnn.safetensors")
    with Checkpoint(ckpt) as checkpoint:
        runner = open_runner(load_model(model), checkpoint)
    with pytest.raises(InputError, match=r"\(dtype int64\) carries no gradient"):
        runner.predict_samples(torch.randn(4, 3), 2)


def test_an_unused_parameter_kept_deterministic_runs(tmp_path):
    model = save_script(Unused().eval(), tmp_path / "net.pt")
    ckpt = convert_file(model, tmp_path / "net.bnn.safetensors", exclude=["spare.*"])
    with Checkpoint(ckpt) as checkpoint:
        runner = open_runner(load_model(model), checkpoint)
    assert runner.predict_samples(torch.randn(4, 3), 3).std(0).min() > 0


def test_the_cli_refuses_a_script_reading_a_copy(tmp_path):
    model = save_script(Doubled().eval(), tmp_path / "net.pt")
    ckpt = convert_file(model, tmp_path / "net.bnn.safetensors")
    save_file({"x": torch.randn(4, 3)}, str(tmp_path / "x.safetensors"))
    result = cli("predict", ckpt, "-m", model, "-i", tmp_path / "x.safetensors", "--json")
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "'lin.weight'" in result.stderr
    assert result.stdout == ""
