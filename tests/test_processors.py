"""The processors: the default rules' replica, the helpers' merges, and plans that write nothing."""

from __future__ import annotations

from io import BytesIO

import pytest
from django.db import connection as db
from django.test.utils import CaptureQueriesContext

from connections.scripting import ScriptError, StopSync
from syncqueue import flow, processors
from syncqueue.models import Twin
from syncqueue.replica import entity_view
from tests.syncpair import RITA, attachment, blue_issue, comment, connect_red, replica, tracker, use_rules
from trackers.builtin import actions
from trackers.builtin.adapter import BuiltinTracker
from trackers.builtin.models import Comment, Issue


@pytest.fixture
def red(project):
    return connect_red()


def plan(connection, remote: dict, key: str | None = None, twin: Twin | None = None, find_user=None, envelope=None):
    """What the active incoming rules want done to ``key`` (None: a first sync) for ``remote``."""
    entity = tracker().get(key) if key else None
    return processors.plan_incoming(
        connection, connection.active_rules, remote, None, entity, twin, find_user=find_user, envelope=envelope
    )


def outgoing_replica(connection, key: str, twin: Twin | None = None) -> dict:
    return processors.run_outgoing(connection, connection.active_rules, tracker().get(key), twin)[0]


def twin_of(connection, key: str, **maps) -> Twin:
    return Twin.objects.create(connection=connection, local_key=key, remote_key="RED-1", **maps)


def attributed(connection, remote_id: str, body: str, name: str = "Rita Red") -> str:
    """A comment as the sync writes it: attribution, body, and the marker naming the remote comment."""
    return f"{name} (Red) wrote:\n\n{body}\n\n[sync {processors.marker_scope(connection)}:{remote_id}]"


# --- outgoing ---------------------------------------------------------------------------------


def test_it_makes_the_replica_the_default_rules_define(red, alice, bob):
    issue = blue_issue(alice, description="Details", priority="High", labels=["ui", "bug"], assignee="bob", type="Bug")
    note = actions.add_comment(issue, "First!", actor=bob)
    file = actions.add_attachment(issue, "log.txt", BytesIO(b"log line"), "text/plain", actor=alice)
    entity = tracker().get(issue.key)
    assert outgoing_replica(red, issue.key) == {
        "key": issue.key,
        "summary": "Made on Blue",
        "description": "Details",
        "type": "Bug",
        "status": "Open",
        "priority": "High",
        "labels": ["bug", "ui"],
        "assignee": {"id": "bob", "name": "Bob", "email": "bob@example.org"},
        "reporter": {"id": "alice", "name": "Alice", "email": "alice@example.org"},
        "comments": [
            {
                "id": str(note.pk),
                "author": {"id": "bob", "name": "Bob", "email": "bob@example.org"},
                "body": "First!",
                "created": entity.comments[0].created.isoformat(),
                "updated": entity.comments[0].updated.isoformat(),
            }
        ],
        "attachments": [
            {
                "id": str(file.pk),
                "filename": "log.txt",
                "size": 8,
                "content_type": "text/plain",
                "sha256": file.sha256,
            }
        ],
    }


def test_it_leaves_out_comments_and_attachments_the_sync_imported(red, alice):
    issue = blue_issue(alice)
    own = actions.add_comment(issue, "Written here", actor=alice)
    imported = actions.add_comment(issue, attributed(red, "c9", "Written on Red"))
    own_file = actions.add_attachment(issue, "here.txt", BytesIO(b"here"), "text/plain")
    imported_file = actions.add_attachment(issue, "red.txt", BytesIO(b"red"), "text/plain")
    twin = twin_of(red, issue.key, comment_map={"c9": str(imported.pk)}, attachment_map={"a9": str(imported_file.pk)})
    sent = outgoing_replica(red, issue.key, twin)
    assert [c["id"] for c in sent["comments"]] == [str(own.pk)]
    assert [a["id"] for a in sent["attachments"]] == [str(own_file.pk)]


def test_it_carries_a_script_error_with_its_line(red, alice):
    use_rules(red, outgoing="replica.summary = issue.summary\n\nreplica.size = len(issue.summary) / 0\n")
    with pytest.raises(ScriptError) as error:
        outgoing_replica(red, blue_issue(alice).key)
    assert error.value.line == 3
    assert str(error.value) == "outgoing rules, line 3: ZeroDivisionError: division by zero"


def test_it_stops_syncing_when_the_outgoing_rules_say_so(red, alice):
    use_rules(red, outgoing='if "private" in issue.labels:\n    helpers.stop_sync("private issue")\n')
    key = blue_issue(alice, labels=["private"]).key
    with pytest.raises(StopSync, match="private issue"):
        outgoing_replica(red, key)
    assert flow.sync_entity(red, key) is None
    assert not red.events.exists()


def test_it_stops_syncing_when_the_incoming_rules_say_so(red):
    use_rules(red, incoming='if "secret" in replica.labels:\n    helpers.stop_sync()\nissue.project = "BLUE"\n')
    with pytest.raises(StopSync, match="stopped by the rules"):
        plan(red, replica(labels=["secret"]))


# --- incoming: fields -------------------------------------------------------------------------


def test_it_plans_a_first_sync_in_the_connection_project(red):
    first = plan(red, replica(summary="New on Red", labels=["x"], priority="Low"))
    assert (first.create, first.project) == (True, "BLUE")
    assert first.fields == {
        "summary": "New on Red",
        "description": "",
        "type": "Task",
        "status": "Open",
        "priority": "Low",
        "labels": ["x"],
    }


def test_it_plans_only_the_fields_that_differ(red, alice):
    key = blue_issue(alice, summary="Same", description="Old").key
    later = plan(red, replica(summary="Same", description="New"), key, twin_of(red, key))
    assert (later.create, later.fields) == (False, {"description": "New"})


def test_it_writes_nothing_while_planning(red, alice):
    issue = blue_issue(alice, summary="Before")
    mapped = actions.add_comment(issue, attributed(red, "c1", "Old"))
    twin = twin_of(red, issue.key, comment_map={"c1": str(mapped.pk)})
    remote = replica(
        summary="After", comments=[comment("c1", "Edited"), comment("c2", "New")], attachments=[attachment("a1", b"x")]
    )
    with CaptureQueriesContext(db) as queries:
        planned = plan(red, remote, issue.key, twin, find_user=BuiltinTracker().find_user)
    assert planned.fields["summary"] == "After"
    assert len(planned.comments) == 2 and len(planned.attachments) == 1
    writes = [q["sql"] for q in queries if not q["sql"].lstrip().upper().startswith("SELECT")]
    assert writes == []
    assert twin.comment_map == {"c1": str(mapped.pk)} and twin.attachment_map == {}
    assert Issue.objects.get().summary == "Before"


def test_it_prints_debug_lines_into_the_plan(red):
    use_rules(red, incoming='issue.project = "BLUE"\nhelpers.debug("saw", replica.summary)\n')
    assert plan(red, replica(summary="Hi")).debug == ["saw Hi"]


# --- incoming: the three-way merge of fields ----------------------------------------------------


def merged_twin(connection, issue, **base) -> Twin:
    """A twin whose last merge saw the other side holding ``base`` (in local terms)."""
    return twin_of(connection, issue.key, merge_base={"summary": "Base", "description": "", **base})


def test_merge_takes_what_only_the_other_side_changed(red, alice):
    issue = blue_issue(alice, summary="Base")
    planned = plan(red, replica(summary="Renamed on Red"), issue.key, merged_twin(red, issue))
    assert (planned.fields, planned.conflicts) == ({"summary": "Renamed on Red"}, [])
    assert planned.merge_base["summary"] == "Renamed on Red"


def test_merge_keeps_what_only_this_side_changed(red, alice):
    issue = blue_issue(alice, summary="Renamed on Blue")
    planned = plan(red, replica(summary="Base"), issue.key, merged_twin(red, issue))
    assert "summary" not in planned.fields, "a stale value from the other side does not overwrite an edit here"
    assert planned.conflicts == []


def test_merge_sees_no_conflict_when_both_sides_made_the_same_change(red, alice):
    issue = blue_issue(alice, summary="Same")
    planned = plan(red, replica(summary="Same"), issue.key, merged_twin(red, issue))
    assert (planned.fields.get("summary"), planned.conflicts) == (None, [])


LATER, EARLIER = "2999-01-01T00:00:00+00:00", "2000-01-01T00:00:00+00:00"


@pytest.mark.parametrize(
    ("policy", "envelope", "chosen", "rule"),
    [
        ("remote", {"policy": "local"}, "remote", "remote"),
        ("remote", {"policy": "newest", "changed": EARLIER}, "remote", "remote"),
        ("local", {"policy": "remote"}, "local", "local"),
        ("newest", {"policy": "local"}, "remote", "theirs"),
        ("newest", {"policy": "remote"}, "local", "theirs"),
        ("newest", {"policy": "newest", "changed": LATER}, "remote", "newest"),
        ("newest", {"policy": "newest", "changed": EARLIER}, "local", "newest"),
        # Contradicting policies fall back to the newer change.
        ("remote", {"policy": "remote", "changed": LATER}, "remote", "newest"),
        ("remote", {"policy": "remote", "changed": EARLIER}, "local", "newest"),
        ("local", {"policy": "local", "changed": LATER}, "remote", "newest"),
        # No date from the other side: the initiator's change (this side's here).
        ("newest", {}, "local", "initiator"),
    ],
)
def test_merge_settles_a_field_changed_on_both_sides_by_both_policies(red, alice, policy, envelope, chosen, rule):
    red.conflict_policy = policy
    issue = blue_issue(alice, summary="Blue's")
    planned = plan(red, replica(summary="Red's"), issue.key, merged_twin(red, issue), envelope=envelope)
    assert planned.conflicts == [
        {"field": "summary", "base": "Base", "local": "Blue's", "remote": "Red's", "chosen": chosen, "policy": rule}
    ]
    assert planned.fields.get("summary") == ("Red's" if chosen == "remote" else None)
    assert planned.merge_base["summary"] == "Red's", "the next merge compares with what Red holds now"


def test_both_sides_settle_a_conflict_the_same_way_whatever_their_policies():
    """Each side computes with the other's policy and date: whichever pair, they pick the same change."""
    policies, dates = ("remote", "local", "newest", None), (None, EARLIER, LATER)
    for blue_policy in policies[:3]:
        for red_policy in policies[:3]:
            for blue_date in dates:
                for red_date in dates:
                    at_blue = processors.Settling(
                        policy=blue_policy,
                        remote_policy=red_policy,
                        remote_changed=processors._when(red_date),
                        initiator=True,
                    ).remote_wins(blue_date)[0]
                    at_red = processors.Settling(
                        policy=red_policy,
                        remote_policy=blue_policy,
                        remote_changed=processors._when(blue_date),
                        initiator=False,
                    ).remote_wins(red_date)[0]
                    assert at_blue != at_red, (blue_policy, red_policy, blue_date, red_date)


def test_merge_dates_this_sides_change_by_the_message_that_first_sent_it(red, alice):
    """Red's change is newer than the update that sent Blue's value, though Blue's issue changed since."""
    red.conflict_policy = "newest"
    issue = blue_issue(alice, summary="Blue's")
    twin = merged_twin(red, issue)
    twin.sent_fields = {"summary": ["Blue's", EARLIER]}
    middle = "2500-01-01T00:00:00+00:00"
    planned = plan(red, replica(summary="Red's"), issue.key, twin, envelope={"policy": "newest", "changed": middle})
    assert (planned.fields.get("summary"), planned.conflicts[0]["policy"]) == ("Red's", "newest")


def test_merge_dates_the_other_sides_value_by_when_it_first_sent_it_not_by_the_message(red, alice):
    """An ack made late carries Red's value of long ago again: that value is older than Blue's."""
    red.conflict_policy = "newest"
    issue = blue_issue(alice, summary="Blue's")
    twin = merged_twin(red, issue)
    twin.sent_fields = {"summary": ["Blue's", "2500-01-01T00:00:00+00:00"]}
    envelope = {"policy": "newest", "changed": LATER, "dates": {"summary": EARLIER}}
    planned = plan(red, replica(summary="Red's"), issue.key, twin, envelope=envelope)
    assert (planned.fields.get("summary"), planned.conflicts[0]["chosen"]) == (None, "local")


def test_merge_does_not_take_back_what_this_side_sent_last(red, alice):
    """The other side holds our last value (an ack that crossed a later edit here): the edit stays."""
    issue = blue_issue(alice, summary="Edited since")
    twin = twin_of(red, issue.key)  # no base yet: a first sync's ack
    twin.sent_fields = {"summary": ["Sent first", EARLIER]}
    planned = plan(red, replica(summary="Sent first"), issue.key, twin)
    assert (planned.fields.get("summary"), planned.conflicts) == (None, [])
    assert planned.merge_base["summary"] == "Sent first"


def test_merge_settles_a_change_that_crossed_ours_though_the_base_equals_ours(red, alice):
    """Red's older message held our value too, and moved the base to it: Red's next change,
    made before ours reached it, is a conflict (newest wins: ours), not a change to take."""
    issue = blue_issue(alice, summary="Blue's")
    twin = merged_twin(red, issue, summary="Blue's")
    twin.sent_fields = {"summary": ["Blue's", "2500-01-01T00:00:00+00:00", 3]}
    envelope = {"policy": "newest", "changed": EARLIER, "seen": 2}
    planned = plan(red, replica(summary="Red's"), issue.key, twin, envelope=envelope)
    assert (planned.fields.get("summary"), [c["chosen"] for c in planned.conflicts]) == (None, ["local"])


@pytest.mark.parametrize(
    ("sent", "envelope"),
    [
        # It had applied the message carrying ours: a later change of its own, whatever the clocks say.
        (["Blue's", LATER, 3], {"changed": EARLIER, "seen": 3}),
        # Dated after ours.
        (["Blue's", EARLIER, 3], {"changed": LATER, "seen": 2}),
        # Ours is a value taken from Red (seq 0): Red's next change is always later.
        (["Blue's", LATER, 0], {"changed": EARLIER, "seen": 2}),
        # Recorded before values carried their message's seq.
        (["Blue's", LATER], {"changed": EARLIER}),
    ],
)
def test_merge_takes_a_change_made_after_ours_where_the_base_equals_ours(red, alice, sent, envelope):
    issue = blue_issue(alice, summary="Blue's")
    twin = merged_twin(red, issue, summary="Blue's")
    twin.sent_fields = {"summary": sent}
    planned = plan(red, replica(summary="Red's"), issue.key, twin, envelope={"policy": "newest", **envelope})
    assert (planned.fields.get("summary"), planned.conflicts) == ("Red's", [])


def test_merge_records_a_value_it_takes_as_the_other_sides(red, alice):
    """Dated as Red dates it, and seq 0: Blue never sent it, so Red cannot have missed it."""
    issue = blue_issue(alice, summary="Base")
    envelope = {"policy": "newest", "changed": LATER, "dates": {"summary": EARLIER}}
    planned = plan(red, replica(summary="Red's"), issue.key, merged_twin(red, issue), envelope=envelope)
    assert planned.taken["summary"] == ["Red's", EARLIER, 0]
    assert planned.taken["status"][1:] == [LATER, 0], "no base yet, no date of its own: the message's"


def test_merge_takes_everything_where_there_is_no_base_yet(red, alice):
    issue = blue_issue(alice, summary="Blue's", priority="High")
    planned = plan(red, replica(summary="Red's", priority="Low"), issue.key, twin_of(red, issue.key))
    assert planned.fields["summary"] == "Red's" and planned.fields["priority"] == "Low"
    assert planned.conflicts == []


def test_merge_refuses_a_field_it_cannot_set(red, alice):
    use_rules(red, incoming="helpers.merge_fields(key='X')")
    issue = blue_issue(alice)
    with pytest.raises(ScriptError, match="merge_fields cannot set 'key'"):
        plan(red, replica(), issue.key, twin_of(red, issue.key))


def test_merge_is_for_the_incoming_rules_only(red, alice):
    use_rules(red, outgoing="helpers.merge_fields(summary='x')")
    with pytest.raises(ScriptError, match="merge_fields is for the incoming rules"):
        outgoing_replica(red, blue_issue(alice).key)


# --- incoming: comments -----------------------------------------------------------------------


@pytest.fixture
def issue(red, alice):
    return blue_issue(alice)


def test_it_adds_a_new_remote_comment_with_attribution(red, issue):
    planned = plan(red, replica(comments=[comment("c1", "Hello")]), issue.key, twin_of(red, issue.key))
    assert planned.comments == [("add", "c1", attributed(red, "c1", "Hello"))]


def test_it_never_sends_back_a_comment_the_sync_wrote_even_when_its_map_lost_it(red, alice):
    issue = blue_issue(alice)
    unrecorded = actions.add_comment(issue, attributed(red, "c7", "Written on Red"))
    other_connection = actions.add_comment(issue, "Ann (Green) wrote:\n\nHi\n\n[sync 0badc0de:c1]")
    quoted = actions.add_comment(issue, "a marker mid-text [sync 0badc0de:c1] is only text", actor=alice)
    sent = outgoing_replica(red, issue.key, twin_of(red, issue.key))
    assert unrecorded.pk not in [int(c["id"]) for c in sent["comments"]]
    assert [int(c["id"]) for c in sent["comments"]] == [other_connection.pk, quoted.pk]


def test_it_links_a_comment_it_wrote_but_never_recorded_instead_of_adding_it_again(red, issue):
    written = actions.add_comment(issue, attributed(red, "c1", "Hello"))
    twin = twin_of(red, issue.key)
    planned = plan(red, replica(comments=[comment("c1", "Hello")]), issue.key, twin)
    assert planned.comments == [("link", "c1", str(written.pk))]
    processors.apply_plan(tracker(), planned, issue.key, twin, fetch_attachment=None)
    assert twin.comment_map == {"c1": str(written.pk)}
    assert Comment.objects.filter(issue=issue).count() == 1


def test_it_updates_an_edited_remote_comment_and_leaves_an_unchanged_one(red, issue):
    edited = actions.add_comment(issue, attributed(red, "c1", "Old"))
    same = actions.add_comment(issue, attributed(red, "c2", "Same"))
    twin = twin_of(red, issue.key, comment_map={"c1": str(edited.pk), "c2": str(same.pk)})
    planned = plan(red, replica(comments=[comment("c1", "New"), comment("c2", "Same")]), issue.key, twin)
    assert planned.comments == [("update", "c1", str(edited.pk), attributed(red, "c1", "New"))]


def test_it_deletes_a_comment_deleted_remotely(red, issue):
    gone = actions.add_comment(issue, attributed(red, "c1", "Bye"))
    twin = twin_of(red, issue.key, comment_map={"c1": str(gone.pk)})
    assert plan(red, replica(comments=[]), issue.key, twin).comments == [("delete", "c1", str(gone.pk))]


def test_it_never_plans_a_mapped_comment_again(red, issue):
    known = actions.add_comment(issue, attributed(red, "c1", "Hello"))
    twin = twin_of(red, issue.key, comment_map={"c1": str(known.pk)})
    assert plan(red, replica(comments=[comment("c1", "Hello")]), issue.key, twin).comments == []


def test_it_plans_a_comment_listed_twice_once(red, issue):
    twice = replica(comments=[comment("c1", "Hello"), comment("c1", "Hello"), {**comment("1", "x"), "id": 1}])
    planned = plan(red, twice, issue.key, twin_of(red, issue.key))
    assert [op[:2] for op in planned.comments] == [("add", "c1"), ("add", "1")]


def test_it_ignores_malformed_comments(red, issue):
    malformed = ["text", None, 5, ["c1"], {"body": "no id"}, {"id": "", "body": "empty id"}]
    strange_author = {"id": "c2", "author": "not a person", "body": None}
    planned = plan(red, replica(comments=[*malformed, strange_author]), issue.key, twin_of(red, issue.key))
    assert planned.comments == [("add", "c2", attributed(red, "c2", "", name="Someone"))]


def test_it_adds_the_planned_comments_once(red, issue):
    twin = twin_of(red, issue.key)
    planned = plan(red, replica(comments=[comment("c1", "Hello")]), issue.key, twin)
    processors.apply_plan(tracker(), planned, issue.key, twin, fetch_attachment=None)
    [added] = Comment.objects.filter(issue=issue)
    assert twin.comment_map == {"c1": str(added.pk)}
    assert plan(red, replica(comments=[comment("c1", "Hello")]), issue.key, twin).is_empty


# --- incoming: attachments --------------------------------------------------------------------


def test_it_adds_a_remote_attachment_by_hash(red, issue):
    remote = attachment("a1", b"content")
    planned = plan(red, replica(attachments=[remote]), issue.key, twin_of(red, issue.key))
    assert planned.attachments == [("add", "a1", remote)]


def test_it_links_a_local_attachment_with_the_same_content_instead_of_adding(red, issue):
    local = actions.add_attachment(issue, "mine.txt", BytesIO(b"same bytes"), "text/plain")
    remote = attachment("a1", b"same bytes", filename="theirs.txt")
    planned = plan(red, replica(attachments=[remote]), issue.key, twin_of(red, issue.key))
    assert planned.attachments == [("link", "a1", str(local.pk))]


def test_it_removes_an_attachment_removed_remotely(red, issue):
    gone = actions.add_attachment(issue, "old.txt", BytesIO(b"old"), "text/plain")
    twin = twin_of(red, issue.key, attachment_map={"a1": str(gone.pk)})
    assert plan(red, replica(attachments=[]), issue.key, twin).attachments == [("remove", "a1", str(gone.pk))]


def test_it_never_plans_a_mapped_attachment_again(red, issue):
    known = actions.add_attachment(issue, "known.txt", BytesIO(b"known"), "text/plain")
    twin = twin_of(red, issue.key, attachment_map={"a1": str(known.pk)})
    assert plan(red, replica(attachments=[attachment("a1", b"known")]), issue.key, twin).attachments == []


def test_it_ignores_malformed_attachments(red, issue):
    malformed = ["file", None, {"filename": "no id"}, {"id": ""}]
    assert plan(red, replica(attachments=malformed), issue.key, twin_of(red, issue.key)).attachments == []


def test_it_plans_an_attachment_listed_twice_once(red, issue):
    twice = replica(attachments=[attachment("a1", b"bytes"), attachment("a1", b"bytes")])
    planned = plan(red, twice, issue.key, twin_of(red, issue.key))
    assert [op[:2] for op in planned.attachments] == [("add", "a1")]


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def helpers(db):
    return processors.Helpers(entity=entity_view(None), find_user=BuiltinTracker().find_user)


def test_it_maps_a_value_or_gives_the_default(helpers):
    statuses = {"New": "Open", "Done": "Closed"}
    assert helpers.map_value("Done", statuses) == "Closed"
    assert helpers.map_value("Unknown", statuses) is None
    assert helpers.map_value("Unknown", statuses, default="Open") == "Open"
    assert helpers.map_value(["not", "hashable"], statuses, default="Open") == "Open"
    with pytest.raises(TypeError, match="needs a dict"):
        helpers.map_value("New", [("New", "Open")])


def test_it_maps_a_value_inside_the_rules(red):
    mapped = 'issue.status = helpers.map_value(replica.status, {"New": "Open"})\n'
    use_rules(red, incoming='issue.project = "BLUE"\n' + mapped)
    assert plan(red, replica(status="New")).fields["status"] == "Open"


def test_it_finds_a_user_by_email_then_by_username(helpers, alice, bob, charlie):
    assert helpers.find_user({"id": "someone", "email": "BOB@example.org"}) == "bob"
    assert helpers.find_user({"id": "charlie", "email": "nobody@red.example"}) == "charlie"
    assert helpers.find_user({"id": "bob", "email": "alice@example.org"}) == "alice"
    assert helpers.find_user(RITA) is None
    assert helpers.find_user(None) is None
    assert helpers.find_user("bob") is None


def test_it_does_not_find_an_inactive_user(helpers, bob):
    bob.is_active = False
    bob.save()
    assert helpers.find_user({"id": "bob", "email": "bob@example.org"}) is None


def test_it_assigns_the_matching_user_on_incoming(red, bob):
    remote = replica(assignee={"id": "robert", "name": "Robert", "email": "bob@example.org"})
    assert plan(red, remote, find_user=BuiltinTracker().find_user).fields["assignee"] == "bob"
