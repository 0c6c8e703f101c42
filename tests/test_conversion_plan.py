"""Tests of bnnify.usecases.conversion_plan: one plan, whether tensor-wise or through a module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnnify.demo import build_model
from bnnify.errors import UnsafeInputError, UsageError
from bnnify.formats.model_files import load_model
from bnnify.formats.safetensors_io import TensorInfo
from bnnify.formats.spec import read_spec, resolve_spec
from bnnify.usecases.conversion_plan import ConversionPlan, plan_conversion

SAMPLES = Path(__file__).resolve().parent.parent / "sample_configs"


@pytest.fixture(scope="module")
def state_dict(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "demo.pt"
    torch.save(build_model().state_dict(), path)
    return path


def produce_all(plan: ConversionPlan) -> dict[str, torch.Tensor]:
    return {info.name: plan.produce(info.name) for info in plan.infos}


@pytest.mark.parametrize("prior", ["gaussian", "empirical_gaussian"])
def test_both_paths_make_the_same_plan(state_dict, prior):
    tensorwise_spec = resolve_spec(None, prior=prior)
    module_spec = resolve_spec(SAMPLES / "state_dict_arch.yaml", prior=prior)
    with load_model(state_dict) as model:
        tensorwise = plan_conversion(model, tensorwise_spec)
        arch = {"arch": module_spec.arch, "arch_kwargs": module_spec.arch_kwargs}
        module = plan_conversion(model, module_spec, **arch)
        tensors = {"tensorwise": produce_all(tensorwise), "module": produce_all(module)}
    # The module path stores the parameters in its own order (local-trick layers first).
    by_name = {r.name: r for r in module.parameters}
    assert tensorwise.parameters == [by_name[r.name] for r in tensorwise.parameters]
    assert [r.name for r in tensorwise.deterministic] == [r.name for r in module.deterministic]
    assert {r.kind for r in tensorwise.deterministic} == {"unknown"}
    assert {r.kind for r in module.deterministic} == {"buffer"}
    assert sorted(tensorwise.infos, key=str) == sorted(module.infos, key=str)
    for name, tensor in tensors["tensorwise"].items():
        # The pretrained posterior starts at the weights: both paths give the same tensors.
        assert torch.equal(tensor, tensors["module"][name]), name
    assert [s.name for s in tensorwise.summary()] == [r.name for r in tensorwise.parameters]
    summaries = {s.name: s for s in module.summary()}
    for a in tensorwise.summary():
        b = summaries[a.name]
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        assert a.kl == pytest.approx(b.kl, rel=1e-6)
        assert a.sigma_mean == pytest.approx(b.sigma_mean, rel=1e-6)


def test_the_records_name_the_output_tensors(state_dict):
    with load_model(state_dict) as model:
        plan = plan_conversion(model, resolve_spec(None, prior="empirical_gaussian"))
    names = {info.name for info in plan.infos}
    for record in plan.parameters:
        keys = {*record.tensors.values(), *record.prior_tensors.values()}
        assert keys == {f"{record.name}.mu", f"{record.name}.rho", f"{record.name}.prior.mu"}
        assert keys <= names
    assert {r.name for r in plan.deterministic} <= names


def test_a_plan_refuses_two_tensors_of_one_name():
    info = TensorInfo("a.mu", torch.float32, (2,))
    with pytest.raises(UsageError, match=r"two output tensors would be named 'a\.mu'"):
        ConversionPlan([], [], [info, info], lambda name: torch.zeros(2), None)


def test_arch_is_read_from_the_spec_only_for_state_dicts(state_dict, tmp_path):
    spec = read_spec(SAMPLES / "state_dict_arch.yaml")
    script = tmp_path / "demo.script.pt"
    torch.jit.save(torch.jit.script(build_model().eval()), str(script))
    with load_model(script) as model, pytest.raises(Exception, match="arch applies"):
        plan_conversion(model, spec)


def test_an_arch_is_built_only_as_confirmed(state_dict):
    spec = read_spec(SAMPLES / "state_dict_arch.yaml")
    with load_model(state_dict) as model:
        with pytest.raises(UnsafeInputError, match="names the architecture"):
            plan_conversion(model, spec)
        with pytest.raises(UnsafeInputError):
            plan_conversion(model, spec, arch=spec.arch, arch_kwargs={"hidden": 3})
        plan = plan_conversion(model, spec, arch=spec.arch, arch_kwargs=spec.arch_kwargs)
    assert {r.kind for r in plan.deterministic} == {"buffer"}
