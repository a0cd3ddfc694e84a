"""Which linears a rewrite (or the checkpoint writer) quantizes, and the typed reasons why one is not.

Patterns are fnmatch patterns on module FQNs ("model.layers.0.self_attn.q_proj"). A string is one
pattern, never a sequence of one-character patterns.
"""

import enum
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

# lm_head and embeddings, and MoE routers (Qwen3-MoE's mlp.gate, Mixtral's block_sparse_moe.gate): N is
# the expert count and the top-k choice amplifies any error
DEFAULT_EXCLUDE = ("lm_head", "*.lm_head", "*embed*", "*.mlp.gate", "*.block_sparse_moe.gate", "*.router")


class SkipReason(enum.Enum):
    """Why a linear was left unquantized: what a caller branches on (the report also gives the detail)."""

    EXCLUDED = "excluded"  # matched an exclude pattern
    NOT_INCLUDED = "not included"  # include patterns given, none matched
    NOT_CONSTANT = "not a constant"  # the weight or bias is computed in the graph
    NO_SCHEME = "no scheme"  # the scheme has nothing for this weight (a checkpoint's FLOAT linear)
    WEIGHT_DTYPE = "weight dtype or rank"
    TIED_EMBEDDING = "tied to an embedding"
    BIAS_SHAPE = "bias shape"
    NO_SHAPE = "no shape metadata"
    ACTIVATION_DTYPE = "activation dtype"
    DYNAMIC_K = "dynamic K"
    K_MISMATCH = "K mismatch"
    K_RULE = "K rule"  # K breaks the scheme's block rule
    EMPTY = "no rows"  # an activation with a 0-sized dim (the kernels refuse empty tensors; F.linear does not)
    DTYPE_MISMATCH = "dtype mismatch"  # activation and weight dtypes differ (eager F.linear raises)
    UNSUPPORTED_MATMUL = "not a linear"  # a weight multiplied by another op (Conv1D's addmm, MoE experts)


@dataclass(frozen=True)
class Skip:
    reason: SkipReason
    detail: str  # for people: names the values that decided it

    def __str__(self) -> str:
        return self.detail


def patterns(value: "str | Iterable[str] | None") -> tuple[str, ...] | None:
    """A string is one pattern; None stays None (no include filter)."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    result = tuple(value)
    if not all(isinstance(p, str) for p in result):
        raise TypeError(f"include/exclude patterns must be strings, got {result!r}")
    return result


@dataclass(frozen=True)
class Selection:
    """include: only linears matching one of these (None: all); exclude: never these, in addition to
    DEFAULT_EXCLUDE (lm_head, embeddings, MoE routers) unless default_exclude=False, which replaces the
    defaults by `exclude` alone (how to quantize lm_head: default_exclude=False)."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    default_exclude: bool = True

    @classmethod
    def of(cls, include=None, exclude=None, default_exclude: bool = True) -> "Selection":
        return cls(patterns(include), patterns(exclude) or (), default_exclude)

    @property
    def excluded(self) -> tuple[str, ...]:
        return (*DEFAULT_EXCLUDE, *self.exclude) if self.default_exclude else self.exclude

    def skip(self, fqn: str | None) -> Skip | None:
        """Why these patterns leave the linear `fqn` alone, or None."""
        if fqn is None:
            if self.include is not None:
                return Skip(SkipReason.NOT_INCLUDED, "module name unknown and include= given")
            return None
        for pattern in self.excluded:
            if fnmatch.fnmatchcase(fqn, pattern):
                default = "default " if pattern in DEFAULT_EXCLUDE and self.default_exclude else ""
                return Skip(SkipReason.EXCLUDED, f"excluded by {default}pattern {pattern!r}")
        if self.include is not None and not any(fnmatch.fnmatchcase(fqn, p) for p in self.include):
            return Skip(SkipReason.NOT_INCLUDED, "not matched by include patterns")
        return None


ALL = Selection()  # every linear but the default exclusions
