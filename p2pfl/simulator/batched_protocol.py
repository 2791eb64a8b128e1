"""The protocol's local step for all cores of one channel at once (the simulator's fast path).

Every local step of every node used to be one ``on_local_step`` call, and dynamic's drift test
``||w - r||² > Δ`` one small tensor operation per node. Here the cores' step counters and the
fields their condition reads (``NodeCore.step_counters``, ``step_fields``; dynamic's
references included) are kept stacked, one row per member; the core class's own vectorised
condition (``which_act``) picks the members that act on this step, the others only have their
counters advanced in one tensor operation (and, for a condition with state, such as dynamic's
smoothed model, that state updated by ``which_act``), and only the acting cores are called.
The decision stays in the core's code: ``which_act`` is the same condition written over rows,
and the acting cores run their ordinary ``on_local_step``.

The stacked rows are the authority for the counters (and ``step_state``) between calls:
``core(row)`` writes them into a core before a driver calls the core (for any event, once per
step however many events it gets), and the state of the cores called is read back before the
next vectorised step. Numbers and flags live in numpy arrays (a row is read or written in ~0.1 µs,
ten times faster than a tensor element) that the tensors ``which_act`` sees share. Tensor
fields (references) are stored once: the core's attribute is pointed at its row of the
stacked tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from p2pfl.protocol.core import NodeCore


class StackedCores:
    """The members of one channel (all cores of one class and config), step state stacked."""

    def __init__(
        self, cores: Sequence[NodeCore], read: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """``read(rows)``: the current shared parameters ``[k, p]`` of the members at rows."""
        kinds = {type(core) for core in cores}
        if len(kinds) != 1:
            raise ValueError(
                f"one channel runs one protocol, got cores of {sorted(map(str, kinds))}"
            )
        self.cls = kinds.pop()
        self.cores = list(cores)
        self.config = self.cores[0].config
        self.read = read
        # Numbers and flags (numpy, shared with the tensors in ``state``), and tensor fields.
        self.counters = {
            name: np.array([getattr(c, name) for c in self.cores], dtype=np.int64)
            for name in self.cls.step_counters
        }
        self.numbers = dict(self.counters)
        self.state: dict[str, torch.Tensor] = {}
        self._rows: dict[str, list[torch.Tensor]] = {}
        for name in self.cls.step_fields:
            values = [getattr(c, name) for c in self.cores]
            if values[0] is None:  # unused by this config (e.g. a condition's state)
                continue
            if isinstance(values[0], torch.Tensor):
                self.state[name] = torch.stack(values)
                rows = list(self.state[name].unbind())
                for core, row in zip(self.cores, rows, strict=True):
                    setattr(core, name, row)
                self._rows[name] = rows
            else:
                self.numbers[name] = np.array(values, dtype=_dtype(values[0]))
        self.state |= {name: torch.from_numpy(column) for name, column in self.numbers.items()}
        self._counter_view = {name: self.state[name] for name in self.counters}
        # What a core is given before it is called: counters and what which_act updated.
        self._written = {
            name: self.numbers[name]
            for name in (*self.cls.step_counters, *self.cls.step_state)
            if name in self.numbers
        }
        # When each core took its first and its latest local step (None: NaN).
        self.clocks = {
            name: np.array(
                [np.nan if getattr(c, name) is None else getattr(c, name) for c in self.cores]
            )
            for name in ("_first_step_at", "_last_step_at")
        }
        self._synced: set[int] = set()  # rows whose core holds the current counters
        self._touched: set[int] = set()  # rows called since the last local step
        self.acted = 0

    def local_step(self, rows: torch.Tensor, now: float) -> list[int]:
        """The members at ``rows`` took one local step: advance the counters of those that do
        not act; return the rows that do (call ``core(row).on_local_step`` on each)."""
        self._read_back()
        if not len(rows):
            return []
        act = self.cls.which_act(self.config, self.state, rows, self.read)
        counting = rows[~act]
        for counter in self._counter_view.values():
            counter.index_add_(0, counting, torch.ones_like(counting))
        index = counting.numpy()
        first = self.clocks["_first_step_at"]
        first[index[np.isnan(first[index])]] = now
        self.clocks["_last_step_at"][index] = now
        self._synced.clear()
        acting = rows[act].tolist()
        self.acted += len(acting)
        return acting

    def core(self, row: int) -> NodeCore:
        """The core at ``row``, its counters brought up to date, for a call into it (its state
        is read back before the next ``local_step``)."""
        core = self.cores[row]
        if row not in self._synced:
            for name, column in self._written.items():
                setattr(core, name, column.item(row))
            for name, clock in self.clocks.items():
                at = clock.item(row)
                setattr(core, name, None if at != at else at)  # NaN: None
            self._synced.add(row)
        self._touched.add(row)
        return core

    def _read_back(self) -> None:
        """Read back the state of every core called since the last local step (numbers one
        column at a time: one numpy assignment per column, not per core)."""
        if not self._touched:
            return
        rows = list(self._touched)
        cores = [self.cores[row] for row in rows]
        index = np.array(rows)
        for name, column in self.numbers.items():
            column[index] = [getattr(core, name) for core in cores]
        for name, clock in self.clocks.items():
            values = [getattr(core, name) for core in cores]
            clock[index] = [np.nan if value is None else value for value in values]
        for name, stored in self._rows.items():
            for row, core in zip(rows, cores, strict=True):
                value = getattr(core, name)
                if value is not stored[row]:  # replaced by the core: copy it in, share the row
                    stored[row].copy_(value)
                    setattr(core, name, stored[row])
        self._touched.clear()

    def flush(self) -> None:
        """Bring every core up to date (e.g. before reading or saving cores)."""
        self._read_back()
        for row in range(len(self.cores)):
            self.core(row)
        self._touched.clear()


def _dtype(value: object) -> type:
    if isinstance(value, bool):
        return np.bool_
    if isinstance(value, int):
        return np.int64
    return np.float64
