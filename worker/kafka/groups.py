"""The coordinator's view of a consumer group (DescribeGroups, OffsetFetch) through an admin client made on first use.

The worker's own consumer knows only what it was told in the last rebalance; the coordinator knows the group as it
is: its state, its members and what each was assigned, and the offsets it committed. `GroupView` is what the
pipeline's group watch compares with the consumer it owns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kafka.admin import KafkaAdminClient
from kafka.structs import TopicPartition

from worker.kafka.config import connection_kwargs
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupView:
    """`state`: the coordinator's group state (`Stable`, `PreparingRebalance`, `CompletingRebalance`, `Empty`,
    `Dead`); `members`: member id -> the partitions the coordinator assigned it."""

    state: str
    members: dict[str, frozenset[TopicPartition]]

    def assigned(self) -> frozenset[TopicPartition]:
        return frozenset().union(*self.members.values())


def group_view(described: dict[str, Any]) -> GroupView:
    """A GroupView from one group of kafka-python's `describe_groups` answer."""
    members = {}
    for member in described.get("members") or ():
        assignment = member.get("member_assignment") or {}
        partitions = frozenset(
            TopicPartition(entry["topic"], p)
            for entry in assignment.get("assigned_partitions") or ()
            for p in entry["partitions"]
        )
        members[str(member["member_id"])] = partitions
    return GroupView(str(described.get("group_state") or "Unknown"), members)


class GroupAdmin:
    """Describes one group and reads its committed offsets; the admin client connects on first use."""

    def __init__(self, settings: Settings, group_id: str, *, client_id: str) -> None:
        self.settings = settings
        self.group_id = group_id
        self.client_id = client_id
        self._admin: Any = None

    def _client(self) -> Any:
        if self._admin is None:
            self._admin = KafkaAdminClient(**connection_kwargs(self.settings, client_id=self.client_id))
        return self._admin

    def describe(self) -> GroupView:
        described = self._client().describe_groups([self.group_id])
        return group_view(described[self.group_id])

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's committed offset of each partition that has one."""
        wanted = list(partitions)
        found = self._client().list_group_offsets({self.group_id: wanted}).get(self.group_id, {})
        return {
            tp: int(o.offset) for tp, o in found.items() if o is not None and o.offset is not None and o.offset >= 0
        }

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
