"""QMP ``transaction``: several actions as one, all or nothing, at one point in time.

Every disk a backup action reads is drained first (new requests of the guest and of exports
wait, those in flight finish), then the actions run in order through the ordinary commands, then
the disks go on: so the snapshots of several disks are of one instant. The backup jobs are
created inside and started together once every action succeeded, as QEMU does. When an action
fails, the actions before it are undone in reverse order (jobs discarded before they ran,
bitmaps restored) and the error of the failing action is the transaction's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fleece.block.graph import BlockGraph
from fleece.block.node import BlockNode
from fleece.commands import command
from fleece.errors import GenericError, QMPError
from fleece.jobs.job import Job
from fleece.jobs.state import JobStatus
from fleece.qmp.schema import check_arguments

#: actions a transaction takes, and the command each runs
ACTIONS = {
    "abort": None,
    "blockdev-backup": "blockdev-backup",
    "drive-backup": "drive-backup",
    "block-dirty-bitmap-add": "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove": "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear": "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable": "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable": "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge": "block-dirty-bitmap-merge",
}
BACKUPS = ("blockdev-backup", "drive-backup")
#: bitmap actions run in two phases through the bitmap commands' ``prepare_bitmap_*``
BITMAP_PREPARE = {
    "block-dirty-bitmap-add": "prepare_bitmap_add",
    "block-dirty-bitmap-remove": "prepare_bitmap_remove",
    "block-dirty-bitmap-clear": "prepare_bitmap_clear",
    "block-dirty-bitmap-enable": "prepare_bitmap_enable",
    "block-dirty-bitmap-disable": "prepare_bitmap_disable",
    "block-dirty-bitmap-merge": "prepare_bitmap_merge",
}

Undo = Callable[[], None]


class TransactionCommands:
    """Mixed into ``Storage``."""

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        raise NotImplementedError

    def schema(self, name: str) -> Any:
        raise NotImplementedError

    def find_node(self, name: str) -> BlockNode:
        raise NotImplementedError

    graph: BlockGraph
    jobs: dict[str, Job]

    if TYPE_CHECKING:  # JobCommands, mixed in after this class, provides it
        @contextmanager
        def jobs_started_after(self) -> Iterator[list[Job]]:
            yield []

    def undo_for(self, action: str, data: dict[str, Any]) -> Undo | None:
        """How to take back ``action`` once it ran (prepared before it runs), or None when
        nothing needs undoing. Command groups extend this (dirty bitmaps do)."""
        if action in BACKUPS:
            job_id = data.get("job-id") or data.get("device")
            return lambda: self._undo_backup(str(job_id))
        return None

    def _undo_backup(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        job.discard()  # created inside this transaction, never started
        if job.status is JobStatus.CONCLUDED:
            job.dismiss()

    @command("transaction", {"actions": "array", "*properties": "object"})
    def transaction(self, actions: list[Any], properties: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
        """Run ``actions`` ([{type, data}]) as one. Raises the failing action's error."""
        mode = (properties or {}).get("completion-mode", "individual")
        if mode != "individual":
            raise GenericError("Action 'completion-mode' 'grouped' is not supported by fleece")
        planned: list[tuple[str, dict[str, Any]]] = []
        for index, action in enumerate(actions):
            if not isinstance(action, dict) or not isinstance(action.get("type"), str):
                raise GenericError(f"Invalid parameter type for 'actions[{index}]', expected: "
                                   "object with a 'type'")
            kind = action["type"]
            if kind not in ACTIONS:
                raise GenericError(f"Parameter 'type' does not accept value '{kind}'")
            data = action.get("data", {})
            if not isinstance(data, dict):
                raise GenericError(f"Invalid parameter type for 'actions[{index}].data', "
                                   "expected: object")
            planned.append((kind, data))
        sources = self._backup_sources(planned)
        undo: list[Undo] = []
        with self.jobs_started_after() as created, self.graph.drained(sources):
            try:
                for kind, data in planned:
                    if kind == "abort":
                        raise GenericError("Transaction aborted using Abort action")
                    if kind in BITMAP_PREPARE:
                        check_arguments(self.schema(kind), data)
                        prepare = getattr(self, BITMAP_PREPARE[kind])
                        action = prepare(**{k.replace("-", "_"): v for k, v in data.items()})
                        action.apply()
                        undo.append(action.undo)
                        continue
                    step = self.undo_for(kind, data)
                    self.execute(str(ACTIONS[kind]), data)
                    if step is not None:
                        undo.append(step)
            except QMPError:
                for step in reversed(undo):
                    step()
                raise
        for job in created:  # after the drained section: a job's first read must not wait
            job.launch()
        return {}

    def _backup_sources(self, planned: list[tuple[str, dict[str, Any]]]) -> list[BlockNode]:
        """The distinct disks the backup actions read, to drain together."""
        nodes: list[BlockNode] = []
        for kind, data in planned:
            device = data.get("device")
            if kind in BACKUPS and isinstance(device, str):
                try:
                    node = self.find_node(device)
                except QMPError:
                    continue  # the action itself will report it
                if node not in nodes:
                    nodes.append(node)
        return nodes
