"""DP accounting: the composed history of a trainer's DP-SGD steps and its epsilon.

A trainer keeps an :class:`AccountantHistory` (plain lists, for Flower's ``context.state``);
a *fresh* Opacus accountant (``rdp`` / ``prv``) computes epsilon from exactly that history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedmem.errors import ConfigError

if TYPE_CHECKING:
    from fedmem.privacy.dp.session import DPSession

ACCOUNTANTS = ("rdp", "prv")

Entry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


def _make_accountant(name: str) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ConfigError(f"privacy.accountant: unknown {name!r}; allowed: {', '.join(ACCOUNTANTS)}")


@dataclass
class AccountantHistory:
    """The DP-SGD steps a trainer has taken: ``(noise_multiplier, sample_rate, steps)`` entries.

    Consecutive entries with the same noise and rate merge, as in Opacus' accountants, so the
    history equals the one an Opacus accountant would hold after the same ``step`` calls.
    Serializes to plain lists (:meth:`to_record` / :meth:`from_record`) for Flower's
    ``context.state``.
    """

    entries: list[Entry] = field(default_factory=list)

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        if steps <= 0:
            return
        entry = (float(noise_multiplier), float(sample_rate), int(steps))
        if self.entries and self.entries[-1][:2] == entry[:2]:
            last = self.entries.pop()
            entry = (last[0], last[1], last[2] + entry[2])
        self.entries.append(entry)

    def record(self, session: DPSession) -> None:
        """Add the steps a session took."""
        self.add(*session.entry())

    @property
    def steps(self) -> int:
        return sum(e[2] for e in self.entries)

    def to_record(self) -> dict[str, list[float] | list[int]]:
        """Plain lists (valid ConfigRecord values)."""
        return {
            "noise-multiplier": [e[0] for e in self.entries],
            "sample-rate": [e[1] for e in self.entries],
            "steps": [e[2] for e in self.entries],
        }

    @classmethod
    def from_record(cls, record: Any) -> AccountantHistory:
        """Inverse of :meth:`to_record` (a dict or a Flower ConfigRecord)."""
        if record is None:
            return cls()
        cols = [list(record[k]) for k in ("noise-multiplier", "sample-rate", "steps")]
        return cls([(float(a), float(b), int(c)) for a, b, c in zip(*cols, strict=True)])

    def accountant(self, accountant: str = "rdp") -> Any:
        """A fresh Opacus accountant whose history is this one."""
        acc = _make_accountant(accountant)
        acc.history = list(self.entries)
        return acc

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon spent at ``delta``, computed by a fresh Opacus accountant (``rdp``/``prv``).

        0 without steps; ``inf`` when any step had no noise.
        """
        if not self.entries:
            return 0.0
        if any(e[0] == 0 for e in self.entries):
            return math.inf
        return float(self.accountant(accountant).get_epsilon(delta=delta))
