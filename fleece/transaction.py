"""QMP ``transaction``: several actions as one, all or nothing, at one point in time.

Every disk a backup action reads is drained first (new requests of the guest and of exports
wait, those in flight finish), then the actions run in order through the ordinary commands, then
the disks go on: so the snapshots of several disks are of one instant. The backup jobs are
created inside and started together once every action succeeded, as QEMU does. When an action
fails, the actions before it are undone in reverse order (jobs discarded before they ran,
bitmaps restored) and the error of the failing action is the transaction's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fleece.bitmaps.commands import BitmapAction, BitmapCommands
from fleece.block.node import BlockNode
from fleece.commands import Nodes, command, command_table
from fleece.errors import GenericError, QMPError
from fleece.jobs.commands import JobCommands
from fleece.jobs.state import JobStatus
from fleece.schema import check_arguments

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
Undo = Callable[[], None]
#: runs a command by name (``Storage.execute``)
Execute = Callable[[str, dict[str, Any]], Any]


class TransactionCommands:
    """``transaction``, given the nodes, the flat command entry it runs actions through, and
    the job and bitmap groups whose actions it starts together or prepares in two phases."""

    def __init__(self, nodes: Nodes, execute: Execute, jobs: JobCommands,
                 bitmaps: BitmapCommands) -> None:
        self.graph = nodes.graph
        self.find_node = nodes.find
        self.execute = execute
        self.jobs = jobs
        #: bitmap actions run in two phases (checked, then applied with an undo)
        self.prepare: dict[str, Callable[..., BitmapAction]] = {
            "block-dirty-bitmap-add": bitmaps.prepare_bitmap_add,
            "block-dirty-bitmap-remove": bitmaps.prepare_bitmap_remove,
            "block-dirty-bitmap-clear": bitmaps.prepare_bitmap_clear,
            "block-dirty-bitmap-enable": bitmaps.prepare_bitmap_enable,
            "block-dirty-bitmap-disable": bitmaps.prepare_bitmap_disable,
            "block-dirty-bitmap-merge": bitmaps.prepare_bitmap_merge,
        }
        self._schemas = command_table(bitmaps)

    def undo_for(self, action: str, data: dict[str, Any]) -> Undo | None:
        """How to take back a backup ``action`` once it ran (prepared before it runs), or None
        when nothing needs undoing (bitmap actions bring their own undo)."""
        if action in BACKUPS:
            job_id = data.get("job-id") or data.get("device")
            return lambda: self._undo_backup(str(job_id))
        return None

    def _undo_backup(self, job_id: str) -> None:
        job = self.jobs.jobs.get(job_id)
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
        with self.jobs.jobs_started_after() as created, self.graph.drained(sources):
            try:
                for kind, data in planned:
                    if kind == "abort":
                        raise GenericError("Transaction aborted using Abort action")
                    prepare = self.prepare.get(kind)
                    if prepare is not None:
                        check_arguments(self._schemas[kind][1].schema, data)
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
