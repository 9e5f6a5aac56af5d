"""Shadow data: every training row plus the audit candidates (or clients) that were left out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmem.data.table import ExampleTable


@dataclass(frozen=True)
class ShadowData:
    """Rows the shadows draw from: the table's rows, then the non-member candidates.

    ``candidate_row[j]``: the row of candidate j (its table row when a member, else one of
    the appended rows). Every non-candidate row is in every shadow; shadow k holds candidate j
    when ``masks[k, j]`` (each candidate in exactly half the shadows).
    """

    x: torch.Tensor
    y: torch.Tensor
    client: torch.Tensor
    candidate_row: torch.Tensor

    def row_masks(self, candidate_masks: torch.Tensor) -> torch.Tensor:
        """(K, rows) bool: all non-candidate rows, plus each shadow's candidates."""
        masks = torch.ones(len(candidate_masks), len(self.y), dtype=torch.bool)
        masks[:, self.candidate_row] = candidate_masks
        return masks


def shadow_data(table: ExampleTable) -> ShadowData:
    out = ~table.audit_member
    n_out = int(out.sum())
    candidate_row = table.audit_row.clone()
    candidate_row[out] = len(table) + torch.arange(n_out)
    return ShadowData(
        x=torch.cat([table.x, table.audit_x[out]]),
        y=torch.cat([table.y_obs, table.audit_y[out]]),
        client=torch.cat([table.client, table.audit_client[out]]),
        candidate_row=candidate_row,
    )


def client_shadow_data(table: ExampleTable) -> ShadowData:
    """Rows of every client, training and held-out: the table's rows, then the held-out
    clients' (``candidate_row`` is empty: inclusion is per client)."""
    return ShadowData(
        x=torch.cat([table.x, table.heldout_x]),
        y=torch.cat([table.y_obs, table.heldout_y]),
        client=torch.cat([table.client, table.heldout_client]),
        candidate_row=torch.empty(0, dtype=torch.int64),
    )
