"""Tests of bnnify.formats.spec: the YAML conversion spec, its validation and flag overrides."""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnnify.bnn import GaussianPrior, PosteriorFactory, PriorFactory
from bnnify.errors import EXIT_USAGE, SpecError
from bnnify.formats.safe_yaml import MAX_DEPTH
from bnnify.formats.spec import (
    ALLOWED_KEYS,
    DEFAULT_SPEC,
    ConversionSpec,
    load_yaml,
    parse_key_values,
    read_spec,
    resolve_spec,
    validate_spec,
)

SAMPLES = Path(__file__).resolve().parent.parent / "sample_configs"


class _Dumper(yaml.SafeDumper):
    """Quotes the strings `load_yaml` reads as numbers (exponents without a dot, YAML 1.2)."""


_Dumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def dump_yaml(data) -> str:
    """Block-style YAML that `load_yaml` reads back unchanged (non-ASCII escaped)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


SAMPLE_NAMES = [
    "gaussian.yaml",
    "partial.yaml",
    "partial_by_kind.yaml",
    "pretrained_moped.yaml",
    "scale_mixture.yaml",
    "state_dict_arch.yaml",
]
# Keyword arguments every registered posterior and prior accepts with these values.
VALID_KWARGS = {
    "posterior": {
        "gaussian": [{}, {"mu_std": 0.2}, {"sigma": 0.05}, {"rho": -4}],
        "pretrained_gaussian": [{}, {"delta": 0.1, "min_sigma": 1e-4}, {"sigma": 0.01}],
    },
    "prior": {
        "gaussian": [{}, {"mu": 0.5, "sigma": 2}],
        "empirical_gaussian": [{}, {"sigma": 0.1}],
        "laplace": [{}, {"mu": 0.0, "scale": 0.5}],
        "scale_mixture": [{}, {"pi": 0.25, "sigma1": 1.0, "sigma2": 0.002}],
    },
}


def parse(text: str, source: str = "spec.yaml") -> ConversionSpec:
    return validate_spec(load_yaml(text, source), source)


def spec_error(text: str, source: str = "spec.yaml") -> str:
    with pytest.raises(SpecError) as info:
        parse(text, source)
    assert info.value.exit_code == EXIT_USAGE
    return str(info.value)


def write(tmp_path: Path, text: str | bytes, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# Happy paths.


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}", "---\n", "~"])
def test_empty_documents_give_the_defaults(text):
    spec = parse(text)
    assert spec == validate_spec(None) == validate_spec({}) == DEFAULT_SPEC
    assert spec.posterior == ("pretrained_gaussian", {"delta": 0.1})
    assert spec.prior == ("gaussian", {})
    assert (spec.device, spec.dtype, spec.include, spec.exclude) == ("cpu", None, None, ())
    assert (spec.seed, spec.arch, spec.arch_kwargs) == (0, None, {})


def test_defaults_are_not_shared_between_specs():
    spec = validate_spec({})
    spec.posterior[1]["delta"] = 99
    assert DEFAULT_SPEC.posterior == ("pretrained_gaussian", {"delta": 0.1})


@pytest.mark.parametrize("kind", ["posterior", "prior"])
def test_every_registered_name_is_accepted_case_insensitively(kind):
    factory = PosteriorFactory if kind == "posterior" else PriorFactory
    for name in factory.names:
        for written in (name, name.upper(), f"  {name.title()} "):
            spec = validate_spec({kind: written})
            assert getattr(spec, kind) == (name, {})


@pytest.mark.parametrize(
    ("kind", "name", "kwargs"),
    [
        (kind, name, kw)
        for kind, table in VALID_KWARGS.items()
        for name, kws in table.items()
        for kw in kws
    ],
)
def test_mapping_form_with_kwargs(kind, name, kwargs):
    spec = parse(yaml.safe_dump({kind: {"name": name.upper(), "kwargs": kwargs}}))
    assert getattr(spec, kind) == (name, kwargs)


def test_kwargs_may_be_null_and_are_sorted():
    spec = parse("posterior: {name: gaussian, kwargs: null}\nprior: {name: gaussian}")
    assert spec.posterior == ("gaussian", {}) and spec.prior == ("gaussian", {})
    spec = parse("prior: {name: gaussian, kwargs: {sigma: 2, mu: 1}}")
    assert list(spec.prior[1]) == ["mu", "sigma"]


def test_user_registered_classes_are_checked_too():
    @PriorFactory.register("test_spec_custom")
    class CustomPrior(GaussianPrior):
        def __init__(self, shape=(), dtype=None, device=None, **options):
            if options:
                raise RuntimeError(f"cannot use {sorted(options)}")
            super().__init__(shape, dtype, device)

    assert validate_spec({"prior": "TEST_SPEC_CUSTOM"}).prior == ("test_spec_custom", {})
    message = spec_error("prior: {name: test_spec_custom, kwargs: {x: 1}}")
    assert "prior.kwargs.x" in message and "RuntimeError: cannot use ['x']" in message


def test_exponent_floats_are_numbers():
    spec = parse("posterior: {name: pretrained_gaussian, kwargs: {delta: 1e-1, min_sigma: 1E-6}}")
    assert spec.posterior == ("pretrained_gaussian", {"delta": 0.1, "min_sigma": 1e-6})


def test_parsing_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    validate_spec({"posterior": {"name": "gaussian", "kwargs": {"mu_std": 1.0}}})
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    ("written", "device"), [("cpu", "cpu"), (" CPU ", "cpu"), ("cpu:0", "cpu")]
)
def test_device(written, device):
    assert validate_spec({"device": written}).device == device


def test_cuda_devices_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert validate_spec({"device": "cuda"}).device == "cuda"
    assert validate_spec({"device": "CUDA:1"}).device == "cuda:1"
    message = spec_error("device: cuda:2")
    assert "'cuda:2'" in message and "not available" in message
    assert "cpu, cuda, cuda:0, cuda:1" in message


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_dtype(dtype):
    spec = validate_spec({"dtype": dtype.upper()})
    assert spec.dtype == dtype
    assert spec.torch_dtype() == getattr(torch, dtype)


def test_null_dtype_keeps_the_models():
    spec = parse("dtype: null")
    assert spec.dtype is None and spec.torch_dtype() is None


def test_include_and_exclude():
    spec = parse("include: '*.weight'\nexclude: ['*norm*', ' *.bias ']")
    assert spec.include == ("*.weight",)
    assert spec.exclude == ("*norm*", "*.bias")
    assert parse("include: null\nexclude: null").include is None
    assert parse("exclude: null").exclude == ()
    assert parse("include: []").include == ()


@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1])
def test_seed(seed):
    assert validate_spec({"seed": seed}).seed == seed


@pytest.mark.parametrize("arch", ["bnnify.demo:build_model", "pkg:Model.from_config", " a:b "])
def test_arch(arch):
    spec = validate_spec(
        {"arch": arch, "arch_kwargs": {"depth": 2, "sizes": [1, 2], "x": {"y": None}}}
    )
    assert spec.arch == arch.strip()
    assert spec.arch_kwargs == {"depth": 2, "sizes": [1, 2], "x": {"y": None}}


def test_null_values_are_the_defaults():
    assert validate_spec(dict.fromkeys(ALLOWED_KEYS)) == DEFAULT_SPEC


def test_empty_arch_kwargs_without_arch_is_the_default():
    assert parse("arch_kwargs: {}") == DEFAULT_SPEC
    assert parse("arch_kwargs: null") == DEFAULT_SPEC


def test_merge_keys_may_override_merged_values():
    text = "base: &b {sigma: 1}\n"
    assert load_yaml(text + "x: {<<: *b, sigma: 2}") == {"base": {"sigma": 1}, "x": {"sigma": 2}}


# JSON round trip.


def test_to_json_is_plain_ordered_json_and_round_trips():
    spec = parse((SAMPLES / "state_dict_arch.yaml").read_text(encoding="utf-8"))
    data = spec.to_json()
    # only and skip appear when given: older readers refuse keys they do not know.
    assert tuple(data) == tuple(k for k in ALLOWED_KEYS if k not in ("only", "skip"))
    assert json.loads(json.dumps(data)) == data
    assert ConversionSpec.from_json(json.loads(json.dumps(data))) == spec
    data["arch_kwargs"]["hidden"] = 7
    data["posterior"]["kwargs"]["delta"] = 7
    assert spec.arch_kwargs["hidden"] == 32 and spec.posterior[1]["delta"] == 0.1


def test_from_json_validates():
    with pytest.raises(SpecError, match="<json>: seed"):
        ConversionSpec.from_json({"seed": -1})
    with pytest.raises(SpecError, match="got a list"):
        ConversionSpec.from_json([1])


# Flags.


def test_parse_key_values_types():
    values = parse_key_values(
        [
            "sigma=0.1",
            "n=3",
            "big=1e3",
            "on=true",
            "none=null",
            "empty=",
            "s=wide",
            " k = -2 ",
            "l=[1]",
        ]
    )
    assert values == {
        "sigma": 0.1,
        "n": 3,
        "big": 1000.0,
        "on": True,
        "none": None,
        "empty": None,
        "s": "wide",
        "k": -2,
        "l": "[1]",
    }
    assert parse_key_values([]) == {}


@pytest.mark.parametrize(
    ("pairs", "fragments"),
    [
        (["sigma"], ["--prior-arg", "missing '='", "'sigma'", "NAME=VALUE"]),
        (["=1"], ["empty name", "'=1'"]),
        (["a=1", "a=2"], ["'a' is given twice", "'a=2'"]),
    ],
)
def test_parse_key_values_errors(pairs, fragments):
    with pytest.raises(SpecError) as info:
        parse_key_values(pairs)
    assert all(fragment in str(info.value) for fragment in fragments), str(info.value)


def test_resolve_without_anything_gives_the_defaults():
    assert resolve_spec() == DEFAULT_SPEC
    assert resolve_spec(include=[], exclude=()) == DEFAULT_SPEC


FILE = """
posterior: {name: pretrained_gaussian, kwargs: {delta: 0.2, min_sigma: 1e-5}}
prior: {name: gaussian, kwargs: {sigma: 0.5}}
device: cpu
dtype: float64
include: ['*.weight']
exclude: ['*norm*']
seed: 3
"""


def test_resolve_reads_the_file(tmp_path):
    assert resolve_spec(write(tmp_path, FILE)) == read_spec(write(tmp_path, FILE))


def test_resolve_flags_override_the_file(tmp_path):
    spec = resolve_spec(
        write(tmp_path, FILE),
        device="CPU",
        dtype="float16",
        include=["decoder.*"],
        exclude=["*.bias", "*embed*"],
        seed=11,
    )
    assert (spec.device, spec.dtype, spec.seed) == ("cpu", "float16", 11)
    assert spec.include == ("decoder.*",) and spec.exclude == ("*.bias", "*embed*")
    assert spec.prior == ("gaussian", {"sigma": 0.5})
    kept = resolve_spec(write(tmp_path, FILE), include=(), exclude=[])
    assert kept.include == ("*.weight",) and kept.exclude == ("*norm*",)
    assert resolve_spec(include="a.*").include == ("a.*",)


def test_resolve_new_name_drops_the_files_kwargs(tmp_path):
    spec = resolve_spec(write(tmp_path, FILE), prior="laplace", posterior="gaussian")
    assert spec.prior == ("laplace", {})
    assert spec.posterior == ("gaussian", {})
    spec = resolve_spec(write(tmp_path, FILE), prior="laplace", prior_args=["scale=2"])
    assert spec.prior == ("laplace", {"scale": 2})


def test_resolve_same_name_keeps_and_merges_kwargs(tmp_path):
    spec = resolve_spec(
        write(tmp_path, FILE),
        prior="Gaussian",
        prior_args=["sigma=0.25", "mu=1"],
        posterior_args=["delta=0.05"],
    )
    assert spec.prior == ("gaussian", {"mu": 1, "sigma": 0.25})
    assert spec.posterior == ("pretrained_gaussian", {"delta": 0.05, "min_sigma": 1e-5})


def test_resolve_args_merge_into_the_default_posterior():
    spec = resolve_spec(posterior_args=["min_sigma=1e-3"], prior_args=["sigma=2"])
    assert spec.posterior == ("pretrained_gaussian", {"delta": 0.1, "min_sigma": 1e-3})
    assert spec.prior == ("gaussian", {"sigma": 2})


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        ({"prior_args": ["sigma=-1"]}, ["command-line flags", "prior.kwargs.sigma", "-1"]),
        ({"prior": "gausian"}, ["unknown prior 'gausian'", "Did you mean 'gaussian'?"]),
        ({"posterior_args": ["sigma"]}, ["--posterior-arg", "missing '='"]),
        ({"device": "gpu"}, ["'gpu'", "Did you mean 'cuda'?", "cpu"]),
        ({"dtype": "float8"}, ["'float8'", "float32, float64, float16, bfloat16"]),
        ({"seed": True}, ["seed", "True"]),
    ],
)
def test_resolve_flag_errors(flags, fragments):
    with pytest.raises(SpecError) as info:
        resolve_spec(**flags)
    assert all(fragment in str(info.value) for fragment in fragments), str(info.value)


def test_resolve_flag_errors_name_the_file(tmp_path):
    path = write(tmp_path, FILE)
    with pytest.raises(SpecError, match=f"command-line flags over {path}"):
        resolve_spec(path, prior_args=["pi=0.5"])


# Errors: each quotes the bad value, says where, and lists the choices.

ERRORS = [
    ("[1, 2]", ["spec.yaml", "expected a mapping", "posterior, prior, device", "[1, 2]"]),
    ("just text", ["expected a mapping", "'just text'"]),
    (
        "prior_args: {sigma: 1}",
        ["spec.yaml: unknown key 'prior_args'", "Did you mean 'prior'?", "Allowed keys: posterior"],
    ),
    ("1: 2", ["keys must be strings", "1"]),
    ("seed: abc", ["seed", "non-negative integer", "'abc'"]),
    ("seed: -1", ["seed", "-1", "out of range"]),
    ("seed: true", ["seed", "boolean True"]),
    ("seed: 1.5", ["seed", "1.5"]),
    (f"seed: {2**64}", ["seed", str(2**64)]),
    ("include: 3", ["include", "glob pattern", "3"]),
    ("exclude: ['ok', 7]", ["exclude[1]", "7"]),
    ("exclude: ['']", ["exclude[0]", "''"]),
    ("device: 1", ["device", "integer 1", '"cpu"']),
    ("device: cuda:x", ["device", "'cuda:x'", "cpu, cuda, mps"]),
    ("device: tpu", ["'tpu'", "Available on this machine: cpu"]),
    ("dtype: float8", ["dtype", "'float8'", "Did you mean 'float64'?", "bfloat16, null"]),
    ("dtype: 32", ["dtype", "32", "float32"]),
    (
        "posterior: gausian",
        ["posterior", "'gausian'", "Did you mean 'gaussian'?", "pretrained_gaussian"],
    ),
    ("prior: lapalce", ["prior", "'lapalce'", "Did you mean 'laplace'?", "scale_mixture"]),
    ("prior: 3", ["prior", "3", "empirical_gaussian, gaussian, laplace"]),
    ("prior: {kwargs: {sigma: 1}}", ["prior", "missing 'name'"]),
    ("prior: {name: [gaussian]}", ["prior.name", "['gaussian']"]),
    (
        "prior: {name: gaussian, args: {}}",
        ["prior: unknown key 'args'", "Did you mean 'kwargs'?", "name, kwargs"],
    ),
    ("prior: {name: gaussian, kwargs: [1]}", ["prior.kwargs", "[1]"]),
    ("prior: {name: gaussian, kwargs: {sigma: -1}}", ["prior.kwargs.sigma", "-1", "mu, sigma"]),
    (
        "prior: {name: gaussian, kwargs: {sigmaa: 1}}",
        ["prior.kwargs.sigmaa", "Did you mean 'sigma'?"],
    ),
    ("prior: {name: gaussian, kwargs: {sigma: abc}}", ["prior.kwargs.sigma", "'abc'"]),
    ("prior: {name: gaussian, kwargs: {sigma: [1]}}", ["prior.kwargs.sigma", "[1]"]),
    ("prior: {name: gaussian, kwargs: {sigma: .inf}}", ["prior.kwargs.sigma", "inf"]),
    ("prior: {name: gaussian, kwargs: {1: 2}}", ["prior.kwargs", "non-empty strings", "1"]),
    (
        "prior: {name: scale_mixture, kwargs: {pi: 2}}",
        ["prior.kwargs.pi", "2", "pi, sigma1, sigma2"],
    ),
    ("prior: {name: empirical_gaussian, kwargs: {mu: 1}}", ["prior.kwargs.mu", "'mu'"]),
    (
        "posterior: {name: gaussian, kwargs: {delta: 0.1}}",
        ["posterior.kwargs.delta", "mu_std, rho"],
    ),
    (
        "posterior: {name: pretrained_gaussian, kwargs: {delta: 0}}",
        ["posterior.kwargs.delta", "0", "delta, min_sigma"],
    ),
    (f"posterior: {{name: gaussian, kwargs: {{sigma: {10**400}}}}}", ["posterior.kwargs.sigma"]),
    ("arch: foo", ["arch", "'foo'", "package.module:callable"]),
    ("arch: 'a..b:c'", ["arch", "'a..b:c'"]),
    ("arch: 'class.x:y'", ["arch", "'class.x:y'"]),
    ("arch: 'a:b:c'", ["arch", "'a:b:c'"]),
    ("arch: 3", ["arch", "3"]),
    ("arch_kwargs: {hidden: 3}", ["arch_kwargs", "without 'arch'", "{'hidden': 3}"]),
    ("arch: a:b\narch_kwargs: [1]", ["arch_kwargs", "[1]"]),
    ("arch: a:b\narch_kwargs: {1: 2}", ["arch_kwargs", "non-empty strings"]),
    ("arch: a:b\narch_kwargs: {x: {1: 2}}", ["arch_kwargs.x", "keys must be strings"]),
    ("arch: a:b\narch_kwargs: {x: [0, .nan]}", ["arch_kwargs.x[1]", "nan"]),
    ("arch: a:b\narch_kwargs: {x: 2020-01-01}", ["arch_kwargs.x", "date"]),
    ("arch: a:b\narch_kwargs: {x: !!binary aGk=}", ["arch_kwargs.x", "bytes"]),
]


@pytest.mark.parametrize(("text", "fragments"), ERRORS)
def test_error_messages(text, fragments):
    message = spec_error(text)
    assert message.startswith("spec.yaml: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("seed: 1\nseed: 2", ["duplicate key 'seed'", "line 2", "first on line 1"]),
        ("prior:\n  name: gaussian\n  kwargs: {sigma: 1, sigma: 2}", ["'sigma'", "line 3"]),
        ("a:\n  - {b: {c: 1, c: 1}}", ["duplicate key 'c'", "line 2"]),
        ("x: !!python/object:os.system echo", ["python/object:os.system", "plain data"]),
        ("x: !!python/name:os.system ''", ["python/name:os.system"]),
        ("x: !!python/object/apply:os.system [echo]", ["python/object/apply"]),
        ("seed: [1,\nprior: x", ["line 2", "column"]),
        ("a: b: c", ["line 1, column 5"]),
        ("x: 2020-13-45", ["'2020-13-45'", "line 1"]),
        ("x: !!int abc", ["'abc'"]),
        ("&a [*a]", ["recursive alias *a"]),
        ("\x00", ["line 1, column 1"]),
        ("--- 1\n--- 2", ["single document"]),
        ("[" * 10_000 + "]" * 10_000, [f"deeper than {MAX_DEPTH}"]),
        ("{a: " * 10_000 + "1" + "}" * 10_000, [f"deeper than {MAX_DEPTH}"]),
        ("- " * 5_000 + "1", [f"deeper than {MAX_DEPTH}"]),
    ],
)
def test_yaml_errors(text, fragments):
    with pytest.raises(SpecError) as info:
        load_yaml(text, "spec.yaml")
    message = str(info.value)
    assert message.startswith("spec.yaml: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_alias_bombs_are_refused_cheaply():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = "arch: a:b\narch_kwargs:\n" + "\n".join(f"  {line}" for line in lines)
    assert "too large" in spec_error(text)


def test_deep_and_self_referential_python_documents():
    deep: list = []
    for _ in range(10_000):
        deep = [deep]
    loop: dict = {}
    loop["x"] = loop
    for document in (deep, {"arch": "a:b", "arch_kwargs": {"x": deep}}, {"seed": deep}):
        with pytest.raises(SpecError):
            validate_spec(document)
    with pytest.raises(SpecError, match="too large"):
        validate_spec({"arch": "a:b", "arch_kwargs": loop})


def test_too_large_documents(tmp_path):
    huge = "seed: 0\n" + "# padding\n" * 200_000
    with pytest.raises(SpecError, match="too large"):
        load_yaml(huge)
    with pytest.raises(SpecError, match="too large"):
        read_spec(write(tmp_path, huge * 3))


def test_read_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="not found") as info:
        read_spec(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(info.value) and "--spec" in str(info.value)
    with pytest.raises(SpecError, match="is a directory, not a regular file"):
        read_spec(tmp_path)
    with pytest.raises(SpecError, match=r"not UTF-8.*0xff at line 2, column 8"):
        read_spec(write(tmp_path, b"seed: 1\nprior: \xff\n"))
    with pytest.raises(
        SpecError, match=r"spec.yaml: invalid YAML at line 3, .*flow sequence \(line 2, column 8\)"
    ):
        read_spec(write(tmp_path, "seed: 1\nprior: [gaussian\n"))
    with pytest.raises(SpecError, match=r"spec.yaml: seed"):
        read_spec(write(tmp_path, "seed: x"))


def test_read_spec_accepts_a_byte_order_mark(tmp_path):
    assert read_spec(write(tmp_path, "\ufeffseed: 5\n")).seed == 5


# Sample configs.


def test_every_sample_config_is_there():
    assert sorted(path.name for path in SAMPLES.glob("*.yaml")) == SAMPLE_NAMES


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.yaml")), ids=lambda path: path.name)
def test_sample_configs_parse(path):
    spec = read_spec(path)
    assert ConversionSpec.from_json(spec.to_json()) == spec
    assert "#" in path.read_text(encoding="utf-8")


def test_sample_config_contents():
    assert read_spec(SAMPLES / "gaussian.yaml").posterior[0] == "gaussian"
    moped = read_spec(SAMPLES / "pretrained_moped.yaml")
    assert moped.posterior[0] == "pretrained_gaussian"
    assert {"delta", "min_sigma"} <= set(moped.posterior[1])
    assert moped.prior[0] == "empirical_gaussian"
    mixture = read_spec(SAMPLES / "scale_mixture.yaml")
    assert mixture.prior[0] == "scale_mixture" and set(mixture.prior[1]) == {
        "pi",
        "sigma1",
        "sigma2",
    }
    arch = read_spec(SAMPLES / "state_dict_arch.yaml")
    assert arch.arch == "bnnify.demo:build_model"
    assert arch.arch_kwargs == {"in_features": 8, "hidden": 32, "out_features": 1}
    partial = read_spec(SAMPLES / "partial.yaml")
    assert partial.include is not None and "*.bias" in partial.exclude
    by_kind = read_spec(SAMPLES / "partial_by_kind.yaml")
    assert by_kind.only == ("linear", "conv") and "*.bias" in by_kind.exclude


# Property-based tests.

# No example database: tests must not write into the working directory.
FAST = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = [*PosteriorFactory.names, *PriorFactory.names, "gausian", "", "Laplace"]
KWARG_NAMES = ["mu", "sigma", "rho", "delta", "min_sigma", "mu_std", "pi", "sigma1", "scale", "x"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.sampled_from(["cpu", "cuda", "float32", "a:b", "*.weight", *NAMES]),
)
keys = st.one_of(
    st.sampled_from([*ALLOWED_KEYS, "name", "kwargs", *KWARG_NAMES]), st.text(max_size=6)
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=20,
)
components = st.one_of(
    st.sampled_from(NAMES),
    st.fixed_dictionaries(
        {"name": st.sampled_from(NAMES)},
        optional={"kwargs": st.dictionaries(st.sampled_from(KWARG_NAMES), scalars, max_size=3)},
    ),
)
spec_like = st.dictionaries(
    st.sampled_from(ALLOWED_KEYS),
    documents,
    max_size=5,
).flatmap(
    lambda doc: st.fixed_dictionaries(
        {}, optional={"posterior": components, "prior": components}
    ).map(lambda extra: {**doc, **extra})
)


def only_spec_errors(run) -> None:
    with contextlib.suppress(SpecError):
        run()


@settings(FAST, max_examples=120)
@given(st.one_of(spec_like, documents))
def test_random_documents_raise_only_spec_errors(document):
    only_spec_errors(lambda: validate_spec(document))
    try:
        text = yaml.safe_dump(document)
    except (yaml.YAMLError, ValueError):
        return
    only_spec_errors(lambda: validate_spec(load_yaml(text, "random.yaml"), "random.yaml"))


YAML_ALPHABET = "{}[]:,-?&*!|>'\"#%@`. \n\tabcdeyn01<=~_\\"


@settings(FAST, max_examples=120)
@given(st.one_of(st.text(max_size=80), st.text(alphabet=YAML_ALPHABET, max_size=80)))
def test_random_text_raises_only_spec_errors(text):
    only_spec_errors(lambda: validate_spec(load_yaml(text, "random.yaml"), "random.yaml"))


@settings(FAST, max_examples=60)
@given(st.binary(max_size=80))
def test_random_bytes_raise_only_spec_errors(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "random-bytes.yaml"
    path.write_bytes(data)
    only_spec_errors(lambda: read_spec(path))
    only_spec_errors(lambda: load_yaml(data))


identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda name: name not in {"if", "in", "is", "or", "as", "def", "del", "for", "and", "not"}
)
patterns = st.from_regex(r"[a-z*?][a-z0-9_.*?]{0,10}", fullmatch=True)
plain = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
arch_values = st.recursive(
    plain,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
valid_specs = st.fixed_dictionaries(
    {},
    optional={
        "posterior": st.sampled_from(
            [
                {"name": n, "kwargs": kw}
                for n, kws in VALID_KWARGS["posterior"].items()
                for kw in kws
            ]
        ),
        "prior": st.sampled_from(
            [{"name": n, "kwargs": kw} for n, kws in VALID_KWARGS["prior"].items() for kw in kws]
        ),
        "device": st.sampled_from(["cpu", "CPU", "cpu:0"]),
        "dtype": st.sampled_from([None, "float32", "float64", "float16", "bfloat16"]),
        "include": st.one_of(st.none(), patterns, st.lists(patterns, max_size=3)),
        "exclude": st.lists(patterns, max_size=3),
        "seed": st.integers(min_value=0, max_value=2**64 - 1),
    },
).flatmap(
    lambda doc: st.one_of(
        st.just(doc),
        st.tuples(
            identifiers, identifiers, st.dictionaries(identifiers, arch_values, max_size=3)
        ).map(lambda arch: {**doc, "arch": f"{arch[0]}.{arch[1]}:build", "arch_kwargs": arch[2]}),
    )
)


@settings(FAST, max_examples=80)
@given(valid_specs)
def test_valid_specs_round_trip(document):
    spec = validate_spec(document)
    data = spec.to_json()
    assert tuple(data) == tuple(k for k in ALLOWED_KEYS if k in data)
    assert ("only" in data) == (spec.only is not None) and ("skip" in data) == bool(spec.skip)
    assert ConversionSpec.from_json(data) == spec
    assert ConversionSpec.from_json(json.loads(json.dumps(data, allow_nan=False))) == spec
    assert validate_spec(load_yaml(dump_yaml(data))) == spec
    if not _has_exponent_strings(data):
        assert validate_spec(load_yaml(yaml.safe_dump(data))) == spec
    assert validate_spec(load_yaml(dump_yaml(document))) == spec


def _has_exponent_strings(value) -> bool:
    """Strings like "1e5": `yaml.safe_dump` leaves them unquoted, `load_yaml` reads floats."""
    if isinstance(value, str):
        try:
            return not math.isnan(float(value.replace("_", ""))) and "e" in value.lower()
        except ValueError:
            return False
    if isinstance(value, dict):
        return any(_has_exponent_strings(k) or _has_exponent_strings(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_exponent_strings(v) for v in value)
    return False
