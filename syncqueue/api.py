"""REST API of the sync for people and tools: sync an entity now, twins, queue statistics."""

from __future__ import annotations

import re

from rest_framework import generics, serializers, status
from rest_framework.permissions import BasePermission
from rest_framework.response import Response
from rest_framework.views import APIView

from connections.api import StaffReadsAdminWrites, StrictSerializer
from connections.models import Connection, Trigger
from syncqueue import flow, monitor, triggers
from syncqueue.models import Conflict, SyncEvent, Twin
from trackers.base import NotFound, TrackerError


class StaffOperates(BasePermission):
    """Queue operations (sync now, stop, retry, run a trigger) are for staff, as on the pages."""

    message = "Only staff may operate the sync."

    def has_permission(self, request, view) -> bool:
        return bool(request.user and request.user.is_authenticated and request.user.is_staff)


class SyncInput(StrictSerializer):
    key = serializers.CharField(max_length=100)


class SyncNow(APIView):
    """The API trigger: POST {"key": ...} brings that entity under sync on this connection now."""

    permission_classes = [StaffOperates]

    def post(self, request, pk: int):
        connection = generics.get_object_or_404(Connection.objects.select_related("active_rules"), pk=pk)
        data = SyncInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            event = flow.sync_entity(connection, data.validated_data["key"], force=True)
        except NotFound as e:
            return Response({"error": str(e)}, status=status.HTTP_404_NOT_FOUND)
        except flow.SyncRefused as e:
            return Response({"error": str(e)}, status=status.HTTP_409_CONFLICT)
        except TrackerError as e:
            code = status.HTTP_400_BAD_REQUEST if e.permanent else status.HTTP_503_SERVICE_UNAVAILABLE
            return Response({"error": str(e)}, status=code)
        body = {"queued": event is not None and event.status != SyncEvent.Status.FAILED}
        if event is not None:
            body.update(event=event.pk, status=event.status, error=event.error or None)
        return Response(body, status=status.HTTP_202_ACCEPTED)


class TwinSerializer(serializers.ModelSerializer):
    connection = serializers.IntegerField(source="connection_id")
    connection_name = serializers.CharField(source="connection.name")
    last_error = serializers.CharField(source="blocked_reason")

    class Meta:
        model = Twin
        fields = [
            "id",
            "connection",
            "connection_name",
            "local_key",
            "remote_key",
            "state",
            "last_synced",
            "last_error",
        ]


class EventSerializer(serializers.ModelSerializer):
    rules_version = serializers.IntegerField(source="rules_version.number", default=None, read_only=True)

    class Meta:
        model = SyncEvent
        fields = [
            "id",
            "direction",
            "kind",
            "seq",
            "message_id",
            "status",
            "attempts",
            "next_attempt",
            "error",
            "error_line",
            "rules_version",
            "created",
            "finished",
        ]


class ConflictSerializer(serializers.ModelSerializer):
    event = serializers.IntegerField(source="event_id", default=None)
    rule = serializers.CharField(read_only=True)

    class Meta:
        model = Conflict
        fields = ["id", "field", "base", "local", "remote", "chosen", "policy", "rule", "event", "created"]


class TwinDetailSerializer(TwinSerializer):
    events = serializers.SerializerMethodField()
    conflicts = serializers.SerializerMethodField()

    class Meta(TwinSerializer.Meta):
        fields = [
            *TwinSerializer.Meta.fields,
            "last_sent",
            "last_received",
            "comment_map",
            "attachment_map",
            "events",
            "conflicts",
        ]

    def get_events(self, twin) -> list:
        recent = twin.events.select_related("rules_version").order_by("-id")[:50]
        return EventSerializer(recent, many=True).data

    def get_conflicts(self, twin) -> list:
        return ConflictSerializer(twin.conflicts.order_by("-id")[:50], many=True).data


class TwinDetail(generics.RetrieveAPIView):
    """One twin with its last replicas both ways and its latest events: what a failure looked like."""

    permission_classes = [StaffReadsAdminWrites]
    serializer_class = TwinDetailSerializer
    queryset = Twin.objects.select_related("connection")


class TwinList(generics.ListAPIView):
    permission_classes = [StaffReadsAdminWrites]
    serializer_class = TwinSerializer

    def get_queryset(self):
        twins = Twin.objects.select_related("connection").order_by("id")
        params = self.request.query_params
        for name, value in params.items():
            if "\x00" in value:
                raise serializers.ValidationError({name: ["Must not contain NUL characters."]})
        if params.get("local_key"):
            twins = twins.filter(local_key__iexact=params["local_key"])
        if params.get("remote_key"):
            twins = twins.filter(remote_key__iexact=params["remote_key"])
        if params.get("connection"):
            # Digits that fit the id column; a bigger number would crash the query, not miss.
            if not re.fullmatch(r"[0-9]{1,18}", params["connection"]):
                raise serializers.ValidationError({"connection": ["Give a connection id."]})
            twins = twins.filter(connection_id=int(params["connection"]))
        if params.get("state"):
            if params["state"] not in Twin.State.values:
                raise serializers.ValidationError({"state": [f"One of {', '.join(Twin.State.values)}."]})
            twins = twins.filter(state=params["state"])
        return twins


class QueueStats(APIView):
    permission_classes = [StaffReadsAdminWrites]

    def get(self, request):
        counts = monitor.queue_counts(Connection.objects.order_by("id"))
        return Response(
            {
                "connections": [
                    {
                        "connection": c.connection.pk,
                        "name": c.connection.name,
                        "status": c.connection.status,
                        "outgoing": c.by_direction.get("outgoing", {}),
                        "incoming": c.by_direction.get("incoming", {}),
                        "blocked_twins": c.blocked,
                    }
                    for c in counts
                ]
            }
        )


class TwinAction(APIView):
    permission_classes = [StaffOperates]
    action = "retry"

    def post(self, request, pk: int):
        twin = generics.get_object_or_404(Twin, pk=pk)
        if self.action == "stop":
            flow.stop_twin(twin)
            return Response({"state": Twin.State.STOPPED})
        retried = flow.resolve_and_retry(twin)
        return Response({"state": Twin.State.OK, "retried": retried})


# Past this a trigger run goes on in the background; the answer counts what was queued so far.
RUN_BUDGET_SECONDS = 20


class RunTrigger(APIView):
    """ "Sync all matches now": every entity matching the trigger comes under sync."""

    permission_classes = [StaffOperates]

    def post(self, request, pk: int):
        trigger = generics.get_object_or_404(Trigger.objects.select_related("connection__active_rules"), pk=pk)
        try:
            queued = triggers.sync_all_matches(trigger, budget_seconds=RUN_BUDGET_SECONDS)
        except flow.SyncRefused as e:
            return Response({"error": str(e)}, status=status.HTTP_409_CONFLICT)
        except TrackerError as e:
            code = status.HTTP_400_BAD_REQUEST if e.permanent else status.HTTP_503_SERVICE_UNAVAILABLE
            return Response({"error": str(e)}, status=code)
        return Response({"queued": queued}, status=status.HTTP_202_ACCEPTED)
