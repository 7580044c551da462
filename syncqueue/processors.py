"""Running the rules: the outgoing processor makes a replica, the incoming one a plan.

Scripts never write to a tracker themselves. The incoming processor turns the script's
changes to ``issue`` and the helpers' merges into an ``IncomingPlan``; ``apply_plan``
carries it out. So a Test Run can show the plan without writing anything, and a
script's time limit never covers a slow tracker.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from connections.models import Connection, RulesVersion
from connections.scripting import DebugLog, ScriptObject, StopSync, compile_script, run_script, to_plain
from syncqueue.replica import SCALARS, entity_view, person_view, plain
from trackers.base import Entity, Tracker, TrackerError

# The last line of every comment the sync writes: the connection (the first 8 hex digits of
# its uuid, which both sides share) and the remote comment's id. It lets the sync know its
# own comments even without the twin's map, e.g. after a crash between writing a comment
# and recording it, so a retry links it instead of adding it twice, and nothing echoes back.
MARKER = re.compile(r"\n*\[sync ([0-9a-f]{8}):([\w.-]{1,40})\]\s*\Z")
WRITABLE = ("summary", "description", "type", "status", "priority", "labels", "assignee", "custom_fields")


class ReadOnly(dict):
    """A read-only view for scripts: ``issue.summary`` and ``issue["summary"]`` read, writes fail."""

    def __init__(self, data: Mapping[str, Any]):
        super().__init__({k: _read_only(v) for k, v in data.items()})

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self.get(name)

    def _refuse(self, *args, **kwargs):
        raise TypeError("this is read-only here; write to the replica (outgoing) or to issue (incoming)")

    __setattr__ = __setitem__ = __delattr__ = __delitem__ = _refuse
    update = setdefault = pop = popitem = clear = __ior__ = _refuse


def _read_only(value):
    if type(value) in SCALARS:
        return value
    if isinstance(value, Mapping):
        return ReadOnly(value)
    if isinstance(value, (list, tuple)):
        return tuple(_read_only(v) for v in value)
    return value


def to_script(value):
    """Plain data as scripts write it: dicts become ScriptObjects at every level."""
    if type(value) in SCALARS:
        return value
    if isinstance(value, Mapping):
        return ScriptObject.of_checked({k: to_script(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return [to_script(v) for v in value]
    return value


class ConnectionView(ReadOnly):
    def __init__(self, connection: Connection):
        super().__init__(
            {
                "name": connection.name,
                "remote_name": connection.remote_name,
                "project": connection.project,
                "uuid": str(connection.uuid),
            }
        )


@dataclass
class IncomingPlan:
    """What the incoming rules want done to the local entity."""

    create: bool
    project: str | None
    fields: dict[str, Any]
    # ("add", remote_id, body) | ("link", remote_id, local_id) | ("update", remote_id, local_id, body)
    # | ("delete", remote_id, local_id)
    comments: list[tuple] = field(default_factory=list)
    # ("add", remote_id, attachment dict) | ("link", remote_id, local_id) | ("remove", remote_id, local_id)
    attachments: list[tuple] = field(default_factory=list)
    debug: list[str] = field(default_factory=list)
    # merge_fields: the base for the next merge (None: the rules did not merge), and the
    # fields both sides changed, each {"field", "base", "local", "remote", "chosen", "policy"}.
    merge_base: dict[str, Any] | None = None
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    # The other side's values merge_fields took, as the twin's ``sent_fields`` records them.
    taken: dict[str, list] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not (self.create or self.fields or self.comments or self.attachments)


def _when(value: Any) -> datetime | None:
    """An aware datetime from a message's ISO text, or None when it says nothing usable."""
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


@dataclass(frozen=True)
class Settling:
    """How a field changed on both sides is settled: the same way on both sides, or they would swap.

    Each side's policy is a vote: "remote" names the other side the winner, "local" itself,
    "newest" neither. One named winner, or both naming the same side, decide. Otherwise
    (no vote, or both claiming, or both yielding) the newer change wins. Each side's value
    is dated by the message that first carried it (its ``changed``, stamped by its
    sender), so both sides compare the same two times; equal or unknown times go to the
    initiator's side. Every message carries its sender's policy, and the date of each of
    its fields' values (``dates``): a message carrying an older value again (an ack of a
    side that kept its value) must not date it anew.
    """

    policy: str = "newest"
    remote_policy: str | None = None
    remote_changed: datetime | None = None
    remote_dates: Mapping[str, str] = field(default_factory=dict)
    # When the entity here last changed: the date of a local change not sent yet.
    local_changed: datetime | None = None
    initiator: bool = True
    # How many of our messages the other side had applied when it wrote this one (``seen``).
    remote_seen: int | None = None

    @classmethod
    def of(cls, connection: Connection, envelope: Mapping[str, Any] | None, entity: Entity | None) -> Settling:
        envelope = envelope or {}
        remote_policy, seen = envelope.get("policy"), envelope.get("seen")
        return cls(
            policy=connection.conflict_policy,
            remote_policy=remote_policy if remote_policy in Connection.ConflictPolicy.values else None,
            remote_changed=_when(envelope.get("changed")),
            remote_dates=envelope.get("dates") if isinstance(envelope.get("dates"), Mapping) else {},
            local_changed=entity.updated if entity is not None else None,
            initiator=connection.is_initiator,
            remote_seen=seen if isinstance(seen, int) and not isinstance(seen, bool) else None,
        )

    def remote_wins(self, ours_sent: str | None, name: str = "") -> tuple[bool, str]:
        """Whether the other side's value of field ``name`` wins, and by which rule (``Conflict.RULES``).

        ``ours_sent``: the ``changed`` of the message that first carried our value, if sent.
        """
        mine = {"remote": True, "local": False}.get(self.policy)
        theirs = {"remote": False, "local": True}.get(self.remote_policy or "")
        if mine is not None and theirs in (None, mine):
            return mine, self.policy
        if theirs is not None and mine is None:
            return theirs, "theirs"
        ours = _when(ours_sent) if ours_sent else self.local_changed
        theirs_date = _when(self.remote_date(name))
        if ours is not None and theirs_date is not None and ours != theirs_date:
            return theirs_date > ours, "newest"
        return not self.initiator, "initiator"

    def remote_date(self, name: str) -> str | None:
        """The date the other side gives its value of ``name``, as the message says it."""
        given = self.remote_dates.get(name)
        if _when(given) is not None:
            return given
        return self.remote_changed.isoformat() if self.remote_changed else None


def sent_fields_of(entity: Entity, before: Mapping[str, Any] | None, seq: int) -> dict[str, list]:
    """The twin's record of each field's value as last sent: ``[value, date, seq]``.

    ``date`` and ``seq`` are those of the message that first carried the value: a value
    already sent keeps them; a new one is dated by the entity's ``updated`` (the
    ``changed`` of message ``seq``, now carrying it). A value taken from the other side is
    recorded as it was there: its date, and seq 0 (see ``IncomingPlan.taken``).
    """
    values = _field_values(entity)
    changed = entity.updated.isoformat() if entity.updated else None
    before = before or {}
    record = {}
    for name, value in values.items():
        old = before.get(name)
        record[name] = old if old is not None and old[0] == value else [value, changed, seq]
    return record


def record_taken(sent_fields: Mapping[str, Any], taken: Mapping[str, list], written: Entity) -> dict[str, list]:
    """``sent_fields`` with the values ``taken`` from the other side that ``written`` holds."""
    values = _field_values(written)
    return {**sent_fields, **{name: entry for name, entry in taken.items() if values.get(name) == entry[0]}}


def _field_values(entity: Entity) -> dict[str, Any]:
    view = {name: getattr(entity, name) for name in WRITABLE}
    view["priority"] = view["priority"] or None
    view["labels"] = list(view["labels"])
    view["custom_fields"] = plain(entity.custom_fields)
    view["assignee"] = person_view(entity.assignee)
    return {name: _local_value(view, name) for name in WRITABLE}


class Helpers:
    """The ``helpers`` object scripts see. Public methods only; they read the twin's maps."""

    def __init__(
        self,
        *,
        entity: dict,
        replica=None,
        comment_map=None,
        attachment_map=None,
        linked_attachments=(),
        remote_name="",
        scope="",
        find_user: Callable[[Any], str | None] | None = None,
        merge_base: Mapping[str, Any] | None = None,
        sent_fields: Mapping[str, Any] | None = None,
        seen_fields: Mapping[str, Any] | None = None,
        settling: Settling | None = None,
    ):
        self._entity = entity
        self._scope = scope
        self._issue = None  # the script's writable issue, set by plan_incoming
        self._base = dict(merge_base or {})
        self._sent = dict(sent_fields or {})
        self._seen = dict(seen_fields or {})
        self._settling = settling or Settling()
        self._merged = False
        self._conflicts: list[dict[str, Any]] = []
        self._taken: dict[str, list] = {}
        self._replica = replica
        self._comment_map = dict(comment_map or {})
        self._attachment_map = dict(attachment_map or {})
        self._linked = set(linked_attachments or ())
        self._remote_name = remote_name
        self._find_user = find_user
        self._log = DebugLog()
        self._comment_ops: list[tuple] = []
        self._attachment_ops: list[tuple] = []

    # --- outgoing ----------------------------------------------------------------------------

    def comments_to_send(self) -> list:
        """The entity's comments, minus those the sync brought here from this remote."""
        imported = set(self._comment_map.values())
        return [
            to_script(c)
            for c in self._entity["comments"]
            if c["id"] not in imported and self._marked_from(c["body"]) is None
        ]

    def attachments_to_send(self) -> list:
        imported = set(self._attachment_map.values()) - self._linked
        return [to_script(a) for a in self._entity["attachments"] if a["id"] not in imported]

    # --- incoming ----------------------------------------------------------------------------

    def merge_comments(self) -> None:
        """Add new remote comments, update edited ones, remove deleted ones; never add one twice."""
        remote = [c for c in (self._replica.get("comments") or []) if isinstance(c, Mapping) and c.get("id")]
        local = {c["id"]: c for c in self._entity["comments"]}
        mapped = set(self._comment_map.values())
        # Comments this sync wrote but never recorded (a crash in between): found by their marker.
        unrecorded = {}
        for c in self._entity["comments"]:
            remote_id = self._marked_from(c["body"])
            if remote_id is not None and c["id"] not in mapped:
                unrecorded.setdefault(remote_id, c["id"])
        seen = set()
        for comment in remote:
            remote_id = str(comment["id"])
            if remote_id in seen:
                continue
            seen.add(remote_id)
            body = self._attributed(comment, remote_id)
            local_id = self._comment_map.get(remote_id)
            if local_id is None and remote_id in unrecorded:
                local_id = unrecorded[remote_id]
                self._comment_ops.append(("link", remote_id, local_id))
            if local_id is None:
                self._comment_ops.append(("add", remote_id, body))
            elif local_id in local and local[local_id]["body"] != body:
                self._comment_ops.append(("update", remote_id, local_id, body))
        for remote_id, local_id in self._comment_map.items():
            if remote_id not in seen and local_id in local:
                self._comment_ops.append(("delete", remote_id, local_id))

    def _attributed(self, comment: Mapping, remote_id: str) -> str:
        author = comment.get("author") or {}
        name = (author.get("name") or author.get("id") or "Someone") if isinstance(author, Mapping) else "Someone"
        where = f" ({self._remote_name})" if self._remote_name else ""
        text = f"{name}{where} wrote:\n\n{comment.get('body') or ''}"
        return f"{text}\n\n[sync {self._scope}:{remote_id}]" if self._can_mark(remote_id) else text

    def _can_mark(self, remote_id: str) -> bool:
        return bool(self._scope) and MARKER.search(f"[sync {self._scope}:{remote_id}]") is not None

    def _marked_from(self, body: str) -> str | None:
        """The remote comment id in the marker of this connection that ends ``body``, or None."""
        found = MARKER.search(body or "") if self._scope else None
        return found.group(2) if found and found.group(1) == self._scope else None

    def merge_attachments(self) -> None:
        """Add remote attachments not here yet (by content hash), remove those deleted remotely."""
        remote = [a for a in (self._replica.get("attachments") or []) if isinstance(a, Mapping) and a.get("id")]
        local = {a["id"]: a for a in self._entity["attachments"]}
        local_by_hash = {a["sha256"]: a["id"] for a in self._entity["attachments"]}
        linked = set(self._attachment_map.values())
        seen = set()
        for attachment in remote:
            remote_id = str(attachment["id"])
            if remote_id in seen:
                continue
            seen.add(remote_id)
            if remote_id in self._attachment_map:
                continue
            existing = local_by_hash.get(attachment.get("sha256"))
            if existing is not None and existing not in linked:
                self._attachment_ops.append(("link", remote_id, existing))
                linked.add(existing)
            else:
                self._attachment_ops.append(("add", remote_id, to_plain(attachment)))
        for remote_id, local_id in self._attachment_map.items():
            if remote_id not in seen and local_id in local:
                self._attachment_ops.append(("remove", remote_id, local_id))

    def merge_fields(self, **fields) -> None:
        """Apply what the other side changed since the last sync, field by field (a three-way merge).

        Each argument names a local field and gives the other side's value in local terms
        (mapped already). The base is that same value from the last merge. A field the
        other side did not change is left alone, so an edit made here is not overwritten;
        nor is a value that is only ours coming back (the last one we sent for that field, or
        the one in the last message of ours the other side had applied).
        A field changed on both sides to different values is a conflict, settled the same
        way on both sides (see ``Settling``) and recorded.
        """
        if self._issue is None:
            raise TypeError("merge_fields is for the incoming rules")
        for name, value in fields.items():
            if name not in WRITABLE:
                raise ValueError(f"merge_fields cannot set {name!r} (it sets: {', '.join(WRITABLE)})")
            remote = to_plain(value)
            local = _local_value(self._entity, name)
            sent = self._sent.get(name)
            self._merged = True
            if (sent is not None and remote == sent[0]) or (name in self._seen and remote == self._seen[name]):
                # The other side holds what we last sent, or what we held in the last message of
                # ours it had applied: a value of ours, not a change of theirs. Applying it could
                # only undo a later edit made here (an ack that crossed it, say).
                pass
            elif name not in self._base:
                self._take(name, remote)  # no base yet: take theirs, as a plain assignment would
            elif remote != self._base[name] and remote != local:
                if local == self._base[name] and not self._crossed(name, local):
                    self._take(name, remote)
                else:
                    ours = sent[1] if sent is not None and sent[0] == local else None
                    take_remote, rule = self._settling.remote_wins(ours, name)
                    if take_remote:
                        self._take(name, remote)
                    self._conflicts.append(
                        {
                            "field": name,
                            "base": self._base[name],
                            "local": local,
                            "remote": remote,
                            "chosen": "remote" if take_remote else "local",
                            "policy": rule,
                        }
                    )
            self._base[name] = remote

    def _take(self, name: str, remote: Any) -> None:
        self._issue[name] = to_script(remote)
        self._taken[name] = [remote, self._settling.remote_date(name), 0]

    def _crossed(self, name: str, local: Any) -> bool:
        """Whether the other side's change of ``name`` was made before our value ``local``, unseen.

        The base can equal our value without the other side having seen it: a value of ours
        it happened to hold too (made there, in its own older message). Its next change is
        then no later than ours but crossed it, a conflict for ``Settling`` as on that side.
        """
        sent = self._sent.get(name)
        if sent is None or sent[0] != local or len(sent) < 3 or not sent[2]:
            return False  # not a value we sent, or one of theirs (seq 0)
        seen = self._settling.remote_seen
        if seen is not None and seen >= sent[2]:
            return False  # it had applied the message carrying ours: a later change of theirs
        ours, theirs = _when(sent[1]), _when(self._settling.remote_date(name))
        return ours is not None and theirs is not None and theirs < ours

    def find_user(self, person) -> str | None:
        """The local user id matching a remote person (by email, then id), or None."""
        if not person or self._find_user is None:
            return None
        return self._find_user(to_plain(person))

    # --- both --------------------------------------------------------------------------------

    def map_value(self, value, mapping, default=None):
        """``mapping[value]`` if present, else ``default``; for forward maps (write reverse maps separately)."""
        if not isinstance(mapping, Mapping):
            raise TypeError("map_value needs a dict as its mapping")
        try:
            return mapping[value]
        except (KeyError, TypeError):
            return default

    def stop_sync(self, reason: str = "stopped by the rules"):
        raise StopSync(str(reason))

    def debug(self, *values) -> None:
        self._log.debug(*values)


def _local_value(view: Mapping[str, Any], name: str) -> Any:
    value = view[name]
    if name == "assignee":
        return value["id"] if value else None
    return value if type(value) in SCALARS else to_plain(value)


def marker_scope(connection: Connection) -> str:
    return connection.uuid.hex[:8]


def _script(rules: RulesVersion, direction: str):
    source = rules.outgoing if direction == "outgoing" else rules.incoming
    return compile_script(source, direction)


def run_outgoing(connection: Connection, rules: RulesVersion, entity: Entity, twin=None) -> tuple[dict, list[str]]:
    """The replica the outgoing rules make of ``entity``, and the script's debug lines."""
    view = entity_view(entity)
    helpers = Helpers(
        entity=view,
        comment_map=twin.comment_map if twin else None,
        attachment_map=twin.attachment_map if twin else None,
        linked_attachments=twin.linked_attachments if twin else (),
        scope=marker_scope(connection),
    )
    replica = ScriptObject()
    printed = run_script(
        _script(rules, "outgoing"),
        {"issue": ReadOnly(view), "replica": replica, "connection": ConnectionView(connection), "helpers": helpers},
        log=helpers._log,
        outputs=("replica",),
    )
    result = to_plain(replica, checked=True)
    result["key"] = entity.key  # always ours to say, whatever the script wrote
    return result, printed


def plan_incoming(
    connection: Connection,
    rules: RulesVersion,
    replica: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
    entity: Entity | None,
    twin=None,
    find_user: Callable[[Any], str | None] | None = None,
    envelope: Mapping[str, Any] | None = None,
    seen_fields: Mapping[str, Any] | None = None,
) -> IncomingPlan:
    """``envelope``: what the message said beside the replica (``changed``, ``policy``, ``seen``);
    ``seen_fields``: our fields in the last of our messages it had applied."""
    view = entity_view(entity)
    issue = to_script({k: view[k] for k in (*WRITABLE, "key", "project", "comments", "attachments")})
    helpers = Helpers(
        entity=view,
        replica=to_script(plain(replica)),
        comment_map=twin.comment_map if twin else None,
        attachment_map=twin.attachment_map if twin else None,
        linked_attachments=twin.linked_attachments if twin else (),
        remote_name=connection.remote_name,
        scope=marker_scope(connection),
        find_user=find_user,
        merge_base=twin.merge_base if twin else None,
        sent_fields=twin.sent_fields if twin else None,
        seen_fields=seen_fields,
        settling=Settling.of(connection, envelope, entity),
    )
    helpers._issue = issue
    printed = run_script(
        _script(rules, "incoming"),
        {
            "issue": issue,
            "replica": helpers._replica,
            "previous": to_script(plain(previous)) if previous is not None else None,
            "first_sync": entity is None,
            "connection": ConnectionView(connection),
            "helpers": helpers,
        },
        log=helpers._log,
        outputs=("issue",),
    )
    after = to_plain(issue, checked=True)
    fields = {}
    for name in WRITABLE:
        new = after.get(name)
        old = view[name]
        if name == "assignee":
            old = old["id"] if old else None
            new = new.get("id") if isinstance(new, Mapping) else new
        if new != old:
            fields[name] = new
    return IncomingPlan(
        create=entity is None,
        project=after.get("project"),
        fields=fields,
        comments=helpers._comment_ops,
        attachments=helpers._attachment_ops,
        debug=printed,
        merge_base=helpers._base if helpers._merged else None,
        conflicts=helpers._conflicts,
        taken=helpers._taken,
    )


def creation_fields(plan: IncomingPlan) -> dict[str, Any]:
    """The fields a first-sync creation writes: those set, and assignee or priority also when emptied."""
    return {k: v for k, v in plan.fields.items() if v is not None or k in ("assignee", "priority")}


def create_entity(tracker: Tracker, plan: IncomingPlan, comments: list[str] | None = None):
    """The first-sync creation a plan asks for.

    With ``comments`` (a tracker with ``create_with_comments``), the comments are written
    with it and the answer is ``(entity, comments added)``.
    """
    if not plan.project:
        raise TrackerError("the incoming rules did not set issue.project for a first sync", permanent=True)
    fields = creation_fields(plan)
    if comments is not None:
        return tracker.create_with_comments(plan.project, fields, comments)
    return tracker.create(plan.project, fields)


def apply_plan(
    tracker: Tracker,
    plan: IncomingPlan,
    key: str | None,
    twin,
    fetch_attachment: Callable[[dict], bytes],
    current: Entity | None = None,
) -> Entity:
    """Carry out ``plan`` on the tracker; updates the twin's maps (the caller saves the twin).

    Returns the entity as written. ``current`` is the entity the plan was made from: when
    the plan writes nothing it is the answer, and no read is spent on it.
    """
    written = current
    comment_ops = plan.comments
    more = False  # comments or attachments written: the entity must be read again
    if plan.create and comment_ops and hasattr(tracker, "create_with_comments"):
        # A first sync brings the issue and its comments: one write, answered without a read.
        adds = [op for op in comment_ops if op[0] == "add"]
        written, added = create_entity(tracker, plan, [op[2] for op in adds])
        key = written.key
        for op, comment in zip(adds, added, strict=True):
            twin.comment_map[op[1]] = comment.id
        comment_ops = [op for op in comment_ops if op[0] != "add"]
        more = bool(comment_ops)
    elif plan.create:
        written = create_entity(tracker, plan)
        key = written.key
    elif plan.fields:
        written = tracker.update(key, plan.fields)
    additions = [op for op in comment_ops if op[0] == "add"]
    if len(additions) > 1 and hasattr(tracker, "add_comments"):
        # A tracker that can write many comments at once does (a first sync brings them all).
        for op, added in zip(additions, tracker.add_comments(key, [op[2] for op in additions]), strict=True):
            twin.comment_map[op[1]] = added.id
        additions, more = [], True
    for op in comment_ops:
        if op[0] == "add":
            if op in additions:
                twin.comment_map[op[1]] = tracker.add_comment(key, op[2]).id
                more = True
        elif op[0] == "link":
            twin.comment_map[op[1]] = op[2]
        elif op[0] == "update":
            tracker.update_comment(key, op[2], op[3])
            more = True
        elif op[0] == "delete":
            tracker.delete_comment(key, op[2])
            twin.comment_map.pop(op[1], None)
            more = True
    for op in plan.attachments:
        if op[0] == "add":
            meta = op[2]
            content = fetch_attachment(meta)
            added = tracker.add_attachment(
                key, meta.get("filename") or "attachment", content, meta.get("content_type") or ""
            )
            twin.attachment_map[op[1]] = added.id
            more = True
        elif op[0] == "link":
            twin.attachment_map[op[1]] = op[2]
            twin.linked_attachments = sorted({*twin.linked_attachments, op[2]})
        elif op[0] == "remove":
            tracker.remove_attachment(key, op[2])
            twin.attachment_map.pop(op[1], None)
            twin.linked_attachments = [i for i in twin.linked_attachments if i != op[2]]
            more = True
    return tracker.get(key) if more or written is None else written
