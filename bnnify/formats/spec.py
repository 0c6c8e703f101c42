"""The conversion spec: how to turn a model into a BNN, read from YAML and overridden by flags."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnnify.bnn import PosteriorFactory, PriorFactory
from bnnify.errors import InputError, SpecError
from bnnify.formats import spec_checks as check
from bnnify.formats.input_file import open_regular
from bnnify.formats.safe_yaml import MAX_CHARS, decode_utf8, load_yaml

__all__ = [
    "ALLOWED_KEYS",
    "DEFAULT_SPEC",
    "ConversionSpec",
    "load_yaml",
    "parse_key_values",
    "read_spec",
    "resolve_device",
    "resolve_prior",
    "resolve_spec",
    "validate_spec",
]

ALLOWED_KEYS = (
    "posterior",
    "prior",
    "device",
    "dtype",
    "include",
    "exclude",
    "only",
    "skip",
    "seed",
    "arch",
    "arch_kwargs",
)


@dataclass(frozen=True)
class ConversionSpec:
    """A validated conversion spec; build it with `validate_spec`, `read_spec` or `resolve_spec`.

    Attributes:
        posterior: Canonical (lower-case) posterior name and its keyword arguments.
        prior: Canonical prior name and its keyword arguments.
        device: Device the conversion runs on ("cpu", "cuda:0", ...).
        dtype: Floating-point dtype to convert the model to, or None to keep it.
        include: Glob patterns of parameter names to make Bayesian (None: all).
        exclude: Glob patterns of parameter names to keep deterministic.
        only: Module kinds (`ModuleKind` words) whose parameters may become Bayesian
            (None: all); needs a model whose module types are known.
        skip: Module kinds whose parameters stay deterministic.
        seed: Seed of the random initialisation.
        arch: "package.module:callable" building the model for a bare state dict.
        arch_kwargs: Keyword arguments of `arch`.

    Example:
        >>> spec = validate_spec({"prior": {"name": "Gaussian", "kwargs": {"sigma": 0.5}}})
        >>> spec.prior, spec.posterior
        (('gaussian', {'sigma': 0.5}), ('pretrained_gaussian', {'delta': 0.1}))
        >>> ConversionSpec.from_json(spec.to_json()) == spec
        True
    """

    posterior: tuple[str, dict]
    prior: tuple[str, dict]
    device: str
    dtype: str | None
    include: tuple[str, ...] | None
    exclude: tuple[str, ...]
    seed: int
    arch: str | None
    arch_kwargs: dict
    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """A JSON-able dict with the keys in `ALLOWED_KEYS` order; `from_json` reads it back.

        `only` and `skip` appear only when given, so that a checkpoint converted without
        them stays readable by bnnify versions that do not know them.
        """
        kinds = {"only": None if self.only is None else list(self.only), "skip": list(self.skip)}
        return {
            "posterior": {"name": self.posterior[0], "kwargs": dict(self.posterior[1])},
            "prior": {"name": self.prior[0], "kwargs": dict(self.prior[1])},
            "device": self.device,
            "dtype": self.dtype,
            "include": None if self.include is None else list(self.include),
            "exclude": list(self.exclude),
            **{key: value for key, value in kinds.items() if value},
            "seed": self.seed,
            "arch": self.arch,
            "arch_kwargs": _copy_json(self.arch_kwargs),
        }

    @classmethod
    def from_json(cls, data: dict, *, recorded: bool = False) -> ConversionSpec:
        """Validates `data` (as `to_json` writes it, or any spec document) into a spec.

        Args:
            data: The document.
            recorded: The spec was recorded elsewhere (in a checkpoint): its device
                need not exist on this machine.

        Raises:
            ValueError: (`SpecError`) If `data` is not a valid spec.
        """
        return validate_spec(data, source="<json>", available_only=not recorded)

    def torch_dtype(self) -> torch.dtype | None:
        """The `torch.dtype` named by `dtype`, or None to keep the model's."""
        return None if self.dtype is None else check.DTYPES[self.dtype]


DEFAULT_SPEC = ConversionSpec(
    posterior=("pretrained_gaussian", {"delta": 0.1}),
    prior=("gaussian", {}),
    device="cpu",
    dtype=None,
    include=None,
    exclude=(),
    seed=0,
    arch=None,
    arch_kwargs={},
)


def read_spec(path: str | Path) -> ConversionSpec:
    """Reads and validates a YAML spec file.

    Raises:
        ValueError: (`SpecError`) If the file is missing, unreadable, not UTF-8, not
            valid YAML (with line and column) or not a valid spec.
    """
    source = str(path)
    try:
        with open_regular(path, "spec file") as file:
            raw = file.read(4 * MAX_CHARS + 1)
    except InputError as error:
        problem = "spec file not found" if "does not exist" in error.message else error.message
        check.fail(source, "", problem, hint="Check the path given to --spec.")
    except OSError as error:
        check.fail(source, "", f"cannot read the spec file: {error.strerror or error}")
    if len(raw) > 4 * MAX_CHARS:
        check.fail(source, "", f"too large for a spec (over {4 * MAX_CHARS} bytes)")
    return validate_spec(load_yaml(decode_utf8(raw, source), source), source)


def validate_spec(
    document: Any, source: str = "<string>", *, available_only: bool = True
) -> ConversionSpec:
    """Validates a loaded spec document; a missing or null key takes its default.

    Posterior and prior arguments are checked by building them on a dummy tensor
    (the global random state is left untouched).

    Args:
        document: The loaded YAML (or JSON) document.
        source: The file name used in error messages.

    Raises:
        ValueError: (`SpecError`) Naming the key path, quoting the bad value and
            listing the valid choices.
    """
    if document is None:
        document = {}
    if not isinstance(document, Mapping):
        keys = ", ".join(ALLOWED_KEYS)
        check.wrong_type(source, "", document, f"a mapping with the keys {keys}")
    check.check_keys(document, ALLOWED_KEYS, source)
    data = {key: value for key, value in document.items() if value is not None}
    default = DEFAULT_SPEC
    posterior, prior = default.posterior, default.prior
    if "posterior" in data:
        posterior = check.check_component(data["posterior"], "posterior", PosteriorFactory, source)
    if "prior" in data:
        prior = check.check_component(data["prior"], "prior", PriorFactory, source)
    include, only = data.get("include"), data.get("only")
    arch = check.check_arch(data.get("arch"), source)
    return ConversionSpec(
        posterior=(posterior[0], dict(posterior[1])),
        prior=(prior[0], dict(prior[1])),
        device=check.check_device(data.get("device", default.device), source, available_only),
        dtype=check.check_dtype(data.get("dtype"), source),
        include=None if include is None else check.check_patterns(include, "include", source),
        exclude=check.check_patterns(data.get("exclude", default.exclude), "exclude", source),
        seed=check.check_seed(data.get("seed", default.seed), source),
        arch=arch,
        arch_kwargs=check.check_arch_kwargs(data.get("arch_kwargs"), arch, source),
        only=None if only is None else check.check_kinds(only, "only", source),
        skip=check.check_kinds(data["skip"], "skip", source) if data.get("skip") else (),
    )


def _copy_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _copy_json(item) for key, item in value.items()}
    return value


def resolve_device(device: str | None) -> str:
    """The `--device` flag, checked to exist on this machine (default "cpu").

    Raises:
        ValueError: (`SpecError`) For a malformed or unavailable device.
    """
    return check.check_device(DEFAULT_SPEC.device if device is None else device, "--device")


def parse_key_values(pairs: Sequence[str], what: str = "--prior-arg") -> dict[str, Any]:
    """Parses `KEY=VALUE` flags; values are YAML scalars (numbers, booleans, null) or strings.

    Example:
        >>> parse_key_values(["sigma=0.1", "mu=-1", "name=wide", "flag=true", "scale=1e-3"])
        {'sigma': 0.1, 'mu': -1, 'name': 'wide', 'flag': True, 'scale': 0.001}

    Raises:
        ValueError: (`SpecError`) For a pair without "=", an empty key or a repeated key.
    """
    result: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = str(pair).partition("=")
        key = key.strip()
        if not equals or not key:
            problem = "missing '='" if not equals else "empty name before '='"
            hint = f"Write {what} NAME=VALUE, for example {what} sigma=0.1."
            check.fail(what, "", f"{problem} in {pair!r}", hint)
        if key in result:
            check.fail(what, "", f"{key!r} is given twice ({pair!r})", hint="Give each name once.")
        result[key] = _scalar(text)
    return result


def _scalar(text: str) -> Any:
    try:
        value = load_yaml(text, "<flag>")
    except SpecError:
        return text.strip()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    # Lists, mappings and dates stay strings: flags carry scalars only.
    return text.strip()


# The pretrained posterior's mutually exclusive ways to set its initial spread.
_SPREADS = {"rho", "sigma", "delta"}


Args = Mapping[str, Any] | Sequence[str]
Component = str | tuple[str, Mapping[str, Any]]


def resolve_spec(
    path: str | Path | ConversionSpec | Mapping[str, Any] | None = None,
    *,
    posterior: Component | None = None,
    posterior_args: Args = (),
    prior: Component | None = None,
    prior_args: Args = (),
    device: str | None = None,
    dtype: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    only: str | Sequence[str] | None = None,
    skip: str | Sequence[str] | None = None,
    seed: int | None = None,
) -> ConversionSpec:
    """The spec of `bnnify convert`: a spec (or the defaults), overridden by flags.

    A new `posterior` (or `prior`) name drops the spec's keyword arguments unless it
    names the same one; `*_args` (a mapping, or `KEY=VALUE` strings) are merged over
    them (a spread argument, `rho`, `sigma` or `delta`, replaces the default
    posterior's `delta`). Empty `include`, `exclude`, `only` and `skip` mean "not given".

    Args:
        path: A YAML spec file, a `ConversionSpec`, a spec document (a mapping), or
            None for the defaults.
        posterior: A posterior name, or `(name, kwargs)`: the name and arguments.
        posterior_args: Posterior arguments merged over the spec's.
        prior: A prior name, or `(name, kwargs)`.
        prior_args: Prior arguments merged over the spec's.
        device: The device to convert on.
        dtype: The floating-point dtype to convert to.
        include: Glob patterns of the parameters to make Bayesian.
        exclude: Glob patterns of the parameters to keep deterministic.
        only: Module kinds whose parameters may become Bayesian ("linear,conv").
        skip: Module kinds whose parameters stay deterministic ("norm,embedding").
        seed: The seed of the random initialisation.

    Raises:
        ValueError: (`SpecError`) If the spec or the flags are invalid.
    """
    base = _base_spec(path)
    data = base.to_json()
    posterior, posterior_kwargs = _named(posterior, posterior_args, "--posterior-arg")
    prior, prior_kwargs = _named(prior, prior_args, "--prior-arg")
    if base.posterior == DEFAULT_SPEC.posterior and set(posterior_kwargs) & _SPREADS:
        # The default spread (delta=0.1) gives way to a spread chosen on the command
        # line (say sigma=0.05): the pretrained posterior takes only one of them.
        data["posterior"] = {"name": base.posterior[0], "kwargs": {}}
    data["posterior"] = _override(data["posterior"], posterior, posterior_kwargs)
    data["prior"] = _override(data["prior"], prior, prior_kwargs)
    flags = {"device": device, "dtype": dtype, "seed": seed}
    data.update({key: value for key, value in flags.items() if value is not None})
    # A lone string is one pattern, not a sequence of one-letter patterns.
    for key, patterns in (
        ("include", include),
        ("exclude", exclude),
        ("only", only),
        ("skip", skip),
    ):
        if patterns:
            data[key] = patterns if isinstance(patterns, str) else list(patterns)
    given = isinstance(path, (str, Path))
    source = f"command-line flags over {path}" if given else "command-line flags"
    return validate_spec(data, source)


def resolve_prior(
    recorded: tuple[str, dict], prior: Component | None = None, prior_args: Args = ()
) -> tuple[str, dict]:
    """A recorded prior overridden by flags, as `resolve_spec` overrides a spec's prior.

    Raises:
        ValueError: (`SpecError`) If the prior or its arguments are invalid.
    """
    current = {"name": recorded[0], "kwargs": dict(recorded[1])}
    component = _override(current, *_named(prior, prior_args, "--prior-arg"))
    return validate_spec({"prior": component}, "command-line flags").prior


def _base_spec(spec: str | Path | ConversionSpec | Mapping[str, Any] | None) -> ConversionSpec:
    if spec is None:
        return DEFAULT_SPEC
    if isinstance(spec, ConversionSpec):
        return spec
    if isinstance(spec, Mapping):
        return validate_spec(spec, "<spec>")
    return read_spec(spec)


def _named(component: Component | None, args: Args, what: str) -> tuple[Any, dict[str, Any]]:
    """The name and the arguments of a `name` or `(name, kwargs)` flag, `args` merged over."""
    extra = dict(args) if isinstance(args, Mapping) else parse_key_values(args, what)
    if isinstance(component, (tuple, list)) and len(component) == 2:
        name, kwargs = component
        if isinstance(kwargs, Mapping):
            return name, {**kwargs, **extra}
    return component, extra


def _override(current: dict, name: str | None, args: dict[str, Any]) -> dict:
    if name is None:
        name, kwargs = current["name"], current["kwargs"]
    else:
        same = isinstance(name, str) and name.strip().lower() == current["name"]
        kwargs = current["kwargs"] if same else {}
    return {"name": name, "kwargs": {**kwargs, **args}}
