"""What a pass did to a graph. Every pass returns a PassReport: what it changed, and what it skipped
with a typed reason (mxfx.selection.SkipReason for linears), never a message to parse."""

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mxfx.selection import Skip, SkipReason


def table(header: tuple, rows: list[tuple]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


@dataclass
class PassReport:
    pass_name: ClassVar[str]

    def summary(self) -> str:
        """One line for logs and the pipeline report."""
        raise NotImplementedError


@dataclass
class LinearReport:
    fqn: str
    k: int | None
    n: int | None
    outcome: str  # "rewritten" or "skipped"
    skip: Skip | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    scheme: str = ""  # the label of the scheme that served (or would have served) it: per linear for checkpoints

    @property
    def reason(self) -> str:
        return "" if self.skip is None else self.skip.detail

    @property
    def skip_reason(self) -> SkipReason | None:
        return None if self.skip is None else self.skip.reason


@dataclass
class RewriteReport(PassReport):
    """quantize_linears: each linear, rewritten or skipped, and the weight bytes it saved."""

    pass_name: ClassVar[str] = "quantize_linears"
    scheme: str
    target: str
    linears: list[LinearReport] = field(default_factory=list)
    activation_quants: int = 0
    folds: list[str] = field(default_factory=list)  # a recipe's o_proj rotations: folded offline, or why not

    @property
    def rewritten(self) -> list[LinearReport]:
        return [linear for linear in self.linears if linear.outcome == "rewritten"]

    @property
    def skipped(self) -> list[LinearReport]:
        return [linear for linear in self.linears if linear.outcome == "skipped"]

    @property
    def bytes_before(self) -> int:
        return sum(linear.bytes_before for linear in self.rewritten)

    @property
    def bytes_after(self) -> int:
        return sum(linear.bytes_after for linear in self.rewritten)

    @property
    def kept(self) -> list[LinearReport]:
        """The linears the scheme was asked about and kept unquantized (a mixed plan's bf16, a checkpoint's
        FLOAT): with the rewritten ones, what mxfx.mixed_precision budgets."""
        return [r for r in self.skipped if r.skip_reason is SkipReason.NO_SCHEME]

    @property
    def weight_bytes(self) -> tuple[int, int]:
        """(before, after) bytes of the rewritten and the kept linears' weights."""
        kept = sum(r.bytes_before for r in self.kept)
        return self.bytes_before + kept, self.bytes_after + kept

    @property
    def weight_bits(self) -> float | None:
        """Average bits per weight element of the rewritten and kept linears (None: there are none)."""
        before, after = self.weight_bytes
        return 16 * after / before if before else None

    @property
    def total_bytes_before(self) -> int:
        """Every listed weight's bytes, skipped ones (MoE experts, Conv1D, excluded linears) included."""
        return sum(linear.bytes_before for linear in self.linears)

    @property
    def total_bytes_after(self) -> int:
        return sum(linear.bytes_after if linear.outcome == "rewritten" else linear.bytes_before
                   for linear in self.linears)

    def summary(self) -> str:
        ratio = f" ({self.bytes_after / self.bytes_before:.4f}x)" if self.bytes_before else ""
        total = (f"; all {len(self.linears)} matmul weights {self.total_bytes_before:,} -> {self.total_bytes_after:,} "
                 f"({self.total_bytes_after / self.total_bytes_before:.4f}x)") if self.total_bytes_before else ""
        return (f"{len(self.rewritten)} rewritten, {len(self.skipped)} skipped, {self.activation_quants} activation "
                f"quantizations; weight bytes {self.bytes_before:,} -> {self.bytes_after:,}{ratio}{total}")

    def __str__(self) -> str:
        header = ("linear", "K", "N", "outcome", "bytes before", "bytes after", "reason")
        rows = [
            (r.fqn, str(r.k), str(r.n), r.outcome, f"{r.bytes_before:,}",
             f"{r.bytes_after:,}" if r.bytes_after else "", r.reason)
            for r in self.linears
        ]
        if any(r.scheme != self.scheme for r in self.linears):  # checkpoints: the path each linear took
            header = (*header[:4], "scheme", *header[4:])
            rows = [(*row[:4], r.scheme, *row[4:]) for row, r in zip(rows, self.linears)]
        return "\n".join([f"mxfx rewrite: scheme {self.scheme}, target {self.target}", table(header, rows),
                          *self.folds, self.summary()])


@dataclass
class LiftReport(PassReport):
    """lift_constants: the prepared constants that became graph inputs, in input order."""

    pass_name: ClassVar[str] = "lift_constants"
    names: list[str] = field(default_factory=list)
    constants: list[torch.Tensor] = field(default_factory=list, repr=False)
    tags: list[dict] = field(default_factory=list, repr=False)  # each constant's node.meta["mxfx"]

    def summary(self) -> str:
        return f"{len(self.constants)} prepared constants lifted to graph inputs"


@dataclass
class PipelineReport:
    """Every pass's report for one graph, in pipeline order."""

    passes: list[PassReport] = field(default_factory=list)

    def get(self, kind: type) -> list:
        return [report for report in self.passes if isinstance(report, kind)]

    def __str__(self) -> str:
        return "\n".join(f"{report.pass_name}: {report.summary()}" for report in self.passes)
