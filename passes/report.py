"""RewriteReport: what a rewrite did to each linear, and what it saved."""

from dataclasses import dataclass, field


@dataclass
class LinearReport:
    fqn: str
    k: int | None
    n: int | None
    outcome: str  # "rewritten" or "skipped"
    reason: str = ""
    bytes_before: int = 0
    bytes_after: int = 0
    scheme: str = ""  # the scheme that served (or would have served) it: per linear for checkpoints


@dataclass
class RewriteReport:
    scheme: str
    target: str
    linears: list[LinearReport] = field(default_factory=list)
    activation_quants: int = 0

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

    def __str__(self) -> str:
        header = ("linear", "K", "N", "outcome", "bytes before", "bytes after", "reason")
        rows = [
            (r.fqn, str(r.k), str(r.n), r.outcome, f"{r.bytes_before:,}", f"{r.bytes_after:,}" if r.bytes_after else "", r.reason)
            for r in self.linears
        ]
        if any(r.scheme != self.scheme for r in self.linears):  # checkpoints: the path each linear took
            header = (*header[:4], "scheme", *header[4:])
            rows = [(*row[:4], r.scheme, *row[4:]) for row, r in zip(rows, self.linears)]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [f"mxfx rewrite: scheme {self.scheme}, target {self.target}"]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
        ratio = f" ({self.bytes_after / self.bytes_before:.4f}x)" if self.bytes_before else ""
        lines.append(
            f"{len(self.rewritten)} rewritten, {len(self.skipped)} skipped, {self.activation_quants} activation "
            f"quantizations; weight bytes {self.bytes_before:,} -> {self.bytes_after:,}{ratio}"
        )
        return "\n".join(lines)
