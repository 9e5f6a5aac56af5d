"""A federated client's private state across rounds: in Flower's ``context.state``, and in
the client's own state files so that a resumed run continues exactly.

What a client keeps (:class:`ClientState`): the last round it trained, how many rounds it has
trained, its record-level DP accountant history, and the state of each training plug-in
(ELR targets, a generator's weights, ...). None of it is ever sent to the server.

``context.state`` lives as long as the node's process. When a run is killed and resumed, the
client processes are new: each client then reads its state from its own files,
``<state_dir>/client-<pid>/round-<r>.pt``, written after every round it trains (in a real
deployment this is the client device's own disk; the server never reads it). The server
resumes from its last checkpoint ``k`` and the client takes its newest state file from a round
``<= k``: a file from a round the server never completed is ignored. Each client keeps its
``keep`` newest files: the server names ``checkpoints.resume_every + 1``, enough since the
server's resume state is never more than ``resume_every`` rounds old.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict

from fedmem.federation.records import config_record, put_records

_CONFIG_KEY = "fedmem-client"
_ARRAYS_KEY = "fedmem-client-arrays"
_FILE = re.compile(r"^round-(\d+)\.pt$")


@dataclass
class ClientState:
    """Everything a client carries from one round to the next."""

    round: int = 0  # the last round this client trained (0: none yet)
    rounds_trained: int = 0
    dp: dict[str, list] | None = None  # AccountantHistory.to_record()
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- Flower context.state ----------------------------------------------------------------
    def to_context(self, state: RecordDict) -> None:
        """Store in ``context.state``: scalars and lists in a ConfigRecord, tensors in an
        ArrayRecord (keys ``plugin/<name>/<key>``)."""
        config: dict[str, Any] = {"round": self.round, "rounds-trained": self.rounds_trained}
        arrays: dict[str, torch.Tensor] = {}
        if self.dp is not None:
            config.update({f"dp/{k}": list(v) for k, v in self.dp.items()})
        for name, pstate in self.plugins.items():
            config[f"plugins/{name}"] = True  # present even when the plug-in keeps no state
            for k, v in pstate.items():
                key = f"plugin/{name}/{k}"
                if isinstance(v, torch.Tensor):
                    arrays[key] = v.detach().cpu()
                else:
                    config[key] = v
        put_records(
            state,
            {
                _CONFIG_KEY: config_record(config),
                _ARRAYS_KEY: ArrayRecord(arrays) if arrays else ArrayRecord(),
            },
        )

    @classmethod
    def from_context(cls, state: RecordDict) -> ClientState | None:
        config = state.get(_CONFIG_KEY)
        if config is None:
            return None
        arrays = state.get(_ARRAYS_KEY)
        tensors = arrays.to_torch_state_dict() if arrays is not None and len(arrays) else {}
        out = cls(round=int(config["round"]), rounds_trained=int(config["rounds-trained"]))
        dp = {k[3:]: list(v) for k, v in config.items() if k.startswith("dp/")}
        out.dp = dp or None
        for key in config:
            if key.startswith("plugins/"):
                out.plugins[key.split("/", 1)[1]] = {}
        for source in (config, tensors):
            for key, v in source.items():
                if key.startswith("plugin/"):
                    _, name, k = key.split("/", 2)
                    out.plugins.setdefault(name, {})[k] = v
        return out

    # -- the client's own files --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "rounds_trained": self.rounds_trained,
            "dp": self.dp,
            "plugins": self.plugins,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClientState:
        return cls(d["round"], d["rounds_trained"], d["dp"], dict(d["plugins"]))


def client_dir(state_dir: str | Path, pid: int) -> Path:
    return Path(state_dir) / f"client-{pid}"


def save_state(state_dir: str | Path, pid: int, state: ClientState, keep: int = 2) -> Path:
    """Write the state after round ``state.round`` (atomically); keep the ``keep`` newest."""
    folder = client_dir(state_dir, pid)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{state.round:05d}.pt"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    torch.save(state.to_dict(), tmp)
    tmp.replace(path)
    for old in _files(folder)[: -max(keep, 1)]:
        old[1].unlink(missing_ok=True)
    return path


def _files(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _FILE.match(p.name))]
    return sorted(found)


def load_state(state_dir: str | Path, pid: int, before_round: int) -> ClientState:
    """The newest saved state from a round ``< before_round`` (a fresh state if none)."""
    for r, path in reversed(_files(client_dir(state_dir, pid))):
        if r < before_round:
            return ClientState.from_dict(torch.load(path, map_location="cpu", weights_only=True))
    return ClientState()


def current_state(
    context_state: RecordDict, state_dir: str | None, pid: int, round_: int
) -> ClientState:
    """The client's state before training ``round_``: from memory when it is there and
    older than ``round_``, else from the client's files (a resumed run), else fresh."""
    mem = ClientState.from_context(context_state)
    if mem is not None and mem.round < round_:
        return mem
    if state_dir:
        return load_state(state_dir, pid, round_)
    return ClientState()
