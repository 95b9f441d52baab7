"""Method and resource options: defined once here, validated here, and turned into CLI options here.

The engine reads a :class:`MergeOptions` field by field (no copy of the fields on the Rust side to keep
in step) and validates again (it never trusts a caller), but users get their errors from this module,
phrased in terms of the option they typed.
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import click

from layerswap_fast import decisions
from layerswap_fast._core import MAX_THREADS
from layerswap_fast.errors import InvalidOptionError

GRANULARITIES = ("layer", "module")
NUMERICS = ("exact", "official")
POLICIES = ("blend", "expert", "safety")
VOCAB_SOURCES = ("outside", "expert")
DTYPES = ("bf16", "f16", "f32", "f64")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(value: int | float | str) -> int:
    """Parses a byte size: ``1073741824``, ``512MiB``, ``1GiB``, ``5GB`` (decimal), ``2g`` (binary).

    Raises:
        InvalidOptionError: the text is not a size.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
        raise InvalidOptionError(f"a size must be a number of bytes or a text like '1GiB', not {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise InvalidOptionError(f"'{value}' is not a size (examples: 512MiB, 1GiB, 5GB, 1073741824)")
    number, unit, binary = m.groups()
    power = " kmgt".index(unit.lower() or " ")
    # "5GB" is decimal like Hugging Face's shard sizes; "5GiB" and a bare "5G" are binary.
    base = 1000 if (unit and not binary and str(value).strip()[-1] in "bB") else 1024
    return int(float(number) * base**power)


@dataclass(frozen=True)
class MergeOptions:
    """Everything that shapes a merge. The method options are described in the README, "How it works".

    Attributes:
        granularity: ``layer`` (one unit per decoder layer) or ``module`` (attention and MLP separately).
        tau: decision threshold on d = p_S − p_M (d > τ → safety, d < −τ → expert, else blend).
        alpha: weight of the safety expert in blends.
        numerics: ``exact`` (float64 statistics, float32 blends rounded once) or ``official`` (the
            authors' bf16 arithmetic, bit for bit).
        outside: what embeddings, final norm and lm_head are made of: blend, expert or safety.
        norms: module granularity: what a layer's own norms are made of (the method, §5: expert).
        vocab_from: the vocabulary tensors (token embeddings, lm_head): ``outside`` treats them like the
            other outside tensors, and then the safety and language experts must have the same vocabulary
            shapes (a clear error otherwise); ``expert`` always takes them from the language expert, for
            a language expert with an extended vocabulary (its tokenizer goes to the output too).
        out_dtype: output dtype (None: same as the language expert; ``official``: bf16).
        max_memory: peak memory budget in bytes.
        threads: worker threads (None: all cores).
        shard_size: maximum bytes of tensor data per output shard.
        allow_non_finite: merge even if a measured tensor holds NaN/Inf.
        tokenizer_from: which model's tokenizer files go to the output (``expert`` by default, ``base``
            in ``official`` numerics, as the authors' code does).
        select: how units are decided: ``adaptive`` (the paper's rule on d and τ) or ``bands`` (fixed
            bands, Bandarkar et al.; layer granularity).
        bands: ``(BOTTOM, TOP, TRANSITION)`` for ``select="bands"``; also accepts ``"2,2,1"``.
        overrides: per-unit decisions applied last, in order (later wins): ``{"3": "safety",
            "2.mlp": "blend:0.25"}``, or a list of ``"UNITS=DECISION"`` strings; stored as pairs.
            Grammar in :mod:`layerswap_fast.decisions`.
    """

    granularity: str = "layer"
    tau: float = 0.001
    alpha: float = 0.5
    numerics: str = "exact"
    outside: str = "blend"
    norms: str = "expert"
    vocab_from: str = "outside"
    out_dtype: Optional[str] = None
    max_memory: int = 1 << 30
    threads: Optional[int] = None
    shard_size: int = 5_000_000_000
    allow_non_finite: bool = False
    tokenizer_from: Optional[str] = None
    select: str = "adaptive"
    bands: Optional[tuple[int, int, int]] = None
    overrides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise InvalidOptionError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

        # Types first: True is an int to Python, and "no" is a true value; neither is a number or a flag here.
        for name in ("tau", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidOptionError(f"{name} must be a number, not {type(value).__name__} {value!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, numbers.Integral)):
            raise InvalidOptionError(f"threads must be a whole number or None, not {type(self.threads).__name__} {self.threads!r}")
        if not isinstance(self.allow_non_finite, bool):
            raise InvalidOptionError(f"allow_non_finite must be True or False, not {type(self.allow_non_finite).__name__} {self.allow_non_finite!r}")
        if self.out_dtype is not None and not isinstance(self.out_dtype, str):
            raise InvalidOptionError(f"out_dtype must be one of {', '.join(DTYPES)} or None; got {self.out_dtype!r}")

        choice("granularity", GRANULARITIES)
        choice("numerics", NUMERICS)
        choice("outside", POLICIES)
        choice("norms", POLICIES)
        choice("vocab_from", VOCAB_SOURCES)
        if self.out_dtype is not None:
            object.__setattr__(self, "out_dtype", str(self.out_dtype).lower())
            choice("out_dtype", DTYPES)
        if self.tokenizer_from is not None:
            choice("tokenizer_from", ("expert", "base", "safety"))
            if self.vocab_from == "expert" and self.tokenizer_from != "expert":
                raise InvalidOptionError(
                    f"vocab_from='expert' takes the language expert's embeddings, so its tokenizer must go with them; "
                    f"got tokenizer_from={self.tokenizer_from!r}"
                )
        if not isinstance(self.tau, (int, float)) or not (self.tau >= 0) or self.tau == float("inf"):
            raise InvalidOptionError(f"tau must be a finite number >= 0; got {self.tau!r}")
        if not isinstance(self.alpha, (int, float)) or not (0.0 <= self.alpha <= 1.0):
            raise InvalidOptionError(f"alpha must be between 0 and 1; got {self.alpha!r}")
        for name in ("max_memory", "shard_size"):
            object.__setattr__(self, name, parse_size(getattr(self, name)))
            if getattr(self, name) <= 0:
                raise InvalidOptionError(f"{name} must be positive; got {getattr(self, name)}")
            if getattr(self, name) >= 2**64:
                raise InvalidOptionError(f"{name} must be below 16 EiB; got {getattr(self, name)}")
        if self.threads is not None:
            object.__setattr__(self, "threads", int(self.threads))
        if self.threads is not None and self.threads < 1:
            raise InvalidOptionError(f"threads must be at least 1; got {self.threads!r}")
        if self.threads is not None and self.threads > MAX_THREADS:
            raise InvalidOptionError(f"threads must be at most {MAX_THREADS}; got {self.threads}")
        choice("select", decisions.SELECTS)
        object.__setattr__(self, "bands", decisions.parse_bands(self.bands))
        object.__setattr__(self, "overrides", decisions.normalize_overrides(self.overrides))
        if self.select == "bands" and self.bands is None:
            raise InvalidOptionError("select 'bands' needs bands BOTTOM,TOP[,TRANSITION] (--bands 2,2,1)")
        if self.select != "bands" and self.bands is not None:
            raise InvalidOptionError("bands are used only with select 'bands' (--select bands)")
        if self.select == "bands" and self.granularity != "layer":
            raise InvalidOptionError("select 'bands' works in layer granularity; got granularity 'module'")

    @property
    def effective_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    @property
    def effective_tokenizer_from(self) -> str:
        if self.tokenizer_from:
            return self.tokenizer_from
        if self.vocab_from == "expert":
            return "expert"
        return "base" if self.numerics == "official" else "expert"

    @property
    def effective_out_dtype(self) -> Optional[str]:
        if self.out_dtype is None and self.numerics == "official":
            return "bf16"
        return self.out_dtype

    def replace(self, **changes: Any) -> "MergeOptions":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- CLI options, generated from one table -------------------------------------------------------

# (flags, MergeOptions field, click kwargs, help group)
_METHOD_OPTIONS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--granularity", "-g"), "granularity", dict(type=click.Choice(GRANULARITIES), default="layer", show_default=True,
        help="Unit of decision: whole decoder layers, or attention and MLP separately.")),
    (("--tau",), "tau", dict(type=float, default=0.001, show_default=True,
        help="Threshold on d = p_S - p_M: d > tau takes the safety expert, d < -tau keeps the language expert, otherwise blend.")),
    (("--alpha",), "alpha", dict(type=float, default=0.5, show_default=True,
        help="Weight of the safety expert in blended units and outside tensors (0..1).")),
    (("--numerics",), "numerics", dict(type=click.Choice(NUMERICS), default="exact", show_default=True,
        help="exact: float64 statistics, float32 blends rounded once. official: the authors' bf16 arithmetic, bit for bit.")),
    (("--outside",), "outside", dict(type=click.Choice(POLICIES), default="blend", show_default=True,
        help="Embeddings, final norm and lm_head: blend them (the paper), or take the expert's or safety's.")),
    (("--norms",), "norms", dict(type=click.Choice(POLICIES), default="expert", show_default=True,
        help="Module granularity: a layer's own norms come from the expert (the paper), safety, or a blend.")),
    (("--vocab-from",), "vocab_from", dict(type=click.Choice(VOCAB_SOURCES), default="outside", show_default=True,
        help="Embeddings and lm_head: like the other outside tensors (vocabularies must match), or always the "
             "language expert's (for an extended vocabulary; its tokenizer goes with them).")),
]
_DECISION_OPTIONS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--select",), "select", dict(type=click.Choice(decisions.SELECTS), default="adaptive", show_default=True,
        help="adaptive: the paper's rule on d and tau. bands: fixed bands (Bandarkar et al.), see --bands.")),
    (("--bands",), "bands", dict(default=None, metavar="BOTTOM,TOP[,TRANSITION]",
        help="With --select bands: layers [0, BOTTOM) and [L-TOP, L) from the language expert, the middle from the "
             "safety expert, TRANSITION blended layers at each inner edge (j-th into the band: safety weight j/(T+1)).")),
    (("--override",), "overrides", dict(multiple=True, metavar="UNITS=DECISION",
        help="Set units' decisions; repeatable, later wins. UNITS: N, A-B, N.attn, N.mlp, A-B.mlp, *.attn, *.mlp; "
             "DECISION: safety, expert, blend (the run's alpha) or blend:ALPHA.")),
]
_RESOURCE_OPTIONS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--max-memory",), "max_memory", dict(default="1GiB", show_default=True,
        help="Peak memory budget (e.g. 512MiB, 2GiB). Memory use does not grow with model size.")),
    (("--threads", "-j"), "threads", dict(type=int, default=None, help="Worker threads [default: all cores].")),
]
_OUTPUT_OPTIONS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("--out-dtype",), "out_dtype", dict(type=click.Choice(DTYPES, case_sensitive=False), default=None,
        help="Output dtype [default: the language expert's; bf16 with --numerics official].")),
    (("--shard-size",), "shard_size", dict(default="5GB", show_default=True, help="Largest output shard (tensor bytes).")),
    (("--tokenizer-from",), "tokenizer_from", dict(type=click.Choice(("expert", "base", "safety")), default=None,
        help="Whose tokenizer files to copy [default: expert; base with --numerics official].")),
    (("--allow-non-finite",), "allow_non_finite", dict(is_flag=True, default=False,
        help="Merge even if a measured tensor contains NaN or Inf.")),
]


def _apply(options: list[tuple[tuple[str, ...], str, dict[str, Any]]]) -> Callable[[Callable], Callable]:
    def decorator(f: Callable) -> Callable:
        for flags, field, kwargs in reversed(options):
            f = click.option(*flags, field, **kwargs)(f)
        return f

    return decorator


method_options = _apply(_METHOD_OPTIONS)
resource_options = _apply(_RESOURCE_OPTIONS)
output_options = _apply(_OUTPUT_OPTIONS)
decision_options = _apply(_DECISION_OPTIONS)

_FIELDS = {field for group in (_METHOD_OPTIONS, _DECISION_OPTIONS, _RESOURCE_OPTIONS, _OUTPUT_OPTIONS) for _, field, _ in group}


def from_cli(params: dict[str, Any]) -> MergeOptions:
    """Builds MergeOptions from the parameters Click collected (unknown keys are ignored)."""
    return MergeOptions(**{k: v for k, v in params.items() if k in _FIELDS and v is not None})


# --- public parameters other than options -----------------------------------------------------------


def path_arg(value: Any, name: str, optional: bool = False) -> Any:
    """A path parameter of the public API as a Path (None only when ``optional``).

    Raises:
        TypeError: naming the parameter, for None (unless optional), numbers, booleans, bytes...
    """
    if value is None and optional:
        return None
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
        text = os.fspath(value)
        if isinstance(text, str) and text:
            from pathlib import Path

            return Path(text)
        raise TypeError(f"{name} must be a non-empty path; got {value!r}")
    raise TypeError(f"{name} must be a path (str or os.PathLike), not {type(value).__name__} {value!r}")


def flag_arg(value: Any, name: str) -> bool:
    """A boolean parameter (``force=``): only True or False, so that ``force="no"`` is not true."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__} {value!r}")
    return value


def callback_arg(value: Any, name: str) -> Any:
    """A callback parameter (``progress=``): callable or None."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, not {type(value).__name__} {value!r}")
    return value


def options_arg(value: Any) -> None:
    if value is not None and not isinstance(value, MergeOptions):
        raise TypeError(f"options must be a MergeOptions or None, not {type(value).__name__} {value!r}")


def toml() -> Any:
    """The TOML parser: ``tomllib`` (Python 3.11+) or ``tomli`` (3.10, a dependency there). Every
    reader of TOML (layouts, plan files, the reference) gets it here."""
    # Looked up by name, not by version, so that the fallback can be tested on 3.11+ too; typed as
    # modules either way (the two parsers have the same API).
    try:
        return importlib.import_module("tomllib")
    except ImportError:
        return importlib.import_module("tomli")


def cli_args(params: dict[str, Any]) -> list[str]:
    """The method and output flags of ``merge`` (and ``verify``) that reproduce a report's
    ``parameters``; values equal to what the command would use anyway are left out. Resource options
    (memory budget, threads) are left out too: the output does not depend on them."""
    known = {k: params[k] for k in ("numerics", "vocab_from") if params.get(k) is not None}
    implied = MergeOptions(**known)
    args: list[str] = []
    for flags, field, kwargs in _METHOD_OPTIONS + _OUTPUT_OPTIONS:
        value = params.get(field)
        flag = next(f for f in flags if f.startswith("--"))
        if kwargs.get("is_flag"):
            if value:
                args.append(flag)
            continue
        if value is None:
            continue
        if field == "tokenizer_from" and value == implied.effective_tokenizer_from:
            continue
        if field == "out_dtype" and value == implied.effective_out_dtype:
            continue
        if field == "shard_size" and parse_size(value) == parse_size(kwargs["default"]):
            continue
        if value == kwargs.get("default"):
            continue
        args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return args
