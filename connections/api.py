"""REST API for connections: list, pair (invite / accept), activate and deactivate.

Staff may read; only admins (superusers) change connections.
"""

from __future__ import annotations

from rest_framework import generics, serializers, status
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.response import Response
from rest_framework.views import APIView

from connections import handshake, lifecycle, rules
from connections.models import Connection, Node, RulesVersion, Trigger
from syncqueue import health
from trackers.base import TrackerError


class StaffReadsAdminWrites(BasePermission):
    message = "Only administrators may change connections."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_staff):
            self.message = "Only staff may see connections."
            return False
        return request.method in SAFE_METHODS or user.is_superuser


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not know, so a typo is an error instead of being ignored."""

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({unknown[0]: ["Unknown field."]})
        return super().to_internal_value(data)


class ConnectionSerializer(serializers.ModelSerializer):
    rules_version = serializers.IntegerField(source="active_rules.number", read_only=True, default=None)
    tracker_problem = serializers.SerializerMethodField(
        help_text="Why this node's tracker cannot be used now (the queue waits), or null."
    )

    class Meta:
        model = Connection
        fields = [
            "id",
            "uuid",
            "name",
            "status",
            "status_detail",
            "is_initiator",
            "remote_name",
            "remote_url",
            "project",
            "rules_version",
            "pulls",
            "conflict_policy",
            "tracker_problem",
            "last_contact",
            "created",
        ]

    def get_tracker_problem(self, connection) -> str | None:
        # Once per serializer: the same for every connection of this node.
        if not hasattr(self, "_tracker_problem"):
            found = health.problem()
            self._tracker_problem = found.problem if found else None
        return self._tracker_problem


class InvitationInput(StrictSerializer):
    name = serializers.CharField(max_length=100)
    project = serializers.CharField(max_length=50, required=False, allow_blank=True, default="")
    hours_valid = serializers.IntegerField(min_value=1, max_value=24 * 14, required=False, default=24)
    rules_template = serializers.ChoiceField(choices=list(rules.TEMPLATES), required=False, default="default")


class AcceptInput(StrictSerializer):
    code = serializers.CharField(max_length=4000)
    name = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
    project = serializers.CharField(max_length=50, required=False, allow_blank=True, default="")
    rules_template = serializers.ChoiceField(choices=list(rules.TEMPLATES), required=False, default="default")
    private = serializers.BooleanField(
        required=False,
        default=False,
        help_text="This node cannot be reached from the other node: it pulls its messages from there.",
    )


class ConnectionList(generics.ListAPIView):
    permission_classes = [StaffReadsAdminWrites]
    serializer_class = ConnectionSerializer
    queryset = Connection.objects.select_related("active_rules").order_by("id")


class ConnectionSettings(StrictSerializer):
    conflict_policy = serializers.ChoiceField(choices=Connection.ConflictPolicy.choices, required=False)
    name = serializers.CharField(max_length=100, required=False)


class ConnectionDetail(generics.RetrieveAPIView):
    """A connection; PATCH changes its name or conflict policy (admins)."""

    permission_classes = [StaffReadsAdminWrites]
    serializer_class = ConnectionSerializer
    queryset = Connection.objects.select_related("active_rules")

    def patch(self, request, *args, **kwargs):
        connection = self.get_object()
        data = ConnectionSettings(data=request.data)
        data.is_valid(raise_exception=True)
        for name, value in data.validated_data.items():
            setattr(connection, name, value)
        connection.save(update_fields=list(data.validated_data))
        return Response(ConnectionSerializer(connection).data)


def _handshake_error(error: handshake.HandshakeError) -> Response:
    return Response({"error": error.message}, status=error.status)


class CreateInvitation(APIView):
    permission_classes = [StaffReadsAdminWrites]

    def post(self, request):
        data = InvitationInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            connection, code, expires = handshake.create_invitation(
                data.validated_data["name"],
                project=data.validated_data["project"],
                author=request.user,
                hours=data.validated_data["hours_valid"],
                template=data.validated_data["rules_template"],
            )
        except handshake.HandshakeError as e:
            return _handshake_error(e)
        return Response(
            {"code": code, "expires": expires, "connection": ConnectionSerializer(connection).data},
            status=status.HTTP_201_CREATED,
        )


class AcceptInvitation(APIView):
    permission_classes = [StaffReadsAdminWrites]

    def post(self, request):
        data = AcceptInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            connection = handshake.accept_invitation(
                data.validated_data["code"],
                name=data.validated_data["name"],
                project=data.validated_data["project"],
                author=request.user,
                template=data.validated_data["rules_template"],
                private=data.validated_data["private"],
            )
        except handshake.HandshakeError as e:
            return _handshake_error(e)
        return Response(ConnectionSerializer(connection).data, status=status.HTTP_201_CREATED)


class SetActive(APIView):
    permission_classes = [StaffReadsAdminWrites]
    active = True

    def post(self, request, pk: int):
        connection = generics.get_object_or_404(Connection, pk=pk)
        try:
            lifecycle.set_active(connection, self.active)
        except lifecycle.LifecycleError as e:
            return Response({"error": str(e)}, status=status.HTTP_409_CONFLICT)
        connection.refresh_from_db()
        return Response(ConnectionSerializer(connection).data)


class TriggerSerializer(serializers.ModelSerializer):
    class Meta:
        model = Trigger
        fields = ["id", "query", "active", "created", "last_run", "running"]
        read_only_fields = ["id", "created", "last_run", "running"]

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - {"query", "active"})
            if unknown:
                raise serializers.ValidationError({unknown[0]: ["Unknown field."]})
        return super().to_internal_value(data)

    def validate_query(self, value: str) -> str:
        # A trigger in words the tracker cannot read would never match; say so now.
        try:
            Node.local().tracker().search(value, limit=1)
        except TrackerError as e:
            if e.permanent:
                raise serializers.ValidationError(str(e)) from None
        return value


class TriggerList(generics.ListCreateAPIView):
    permission_classes = [StaffReadsAdminWrites]
    serializer_class = TriggerSerializer

    def get_connection(self) -> Connection:
        return generics.get_object_or_404(Connection, pk=self.kwargs["pk"])

    def get_queryset(self):
        return self.get_connection().triggers.order_by("id")

    def perform_create(self, serializer):
        serializer.save(connection=self.get_connection())


class RulesVersionSerializer(serializers.ModelSerializer):
    author = serializers.CharField(source="author.username", default=None, read_only=True)
    active = serializers.SerializerMethodField()

    class Meta:
        model = RulesVersion
        fields = ["id", "number", "outgoing", "incoming", "author", "comment", "created", "active"]

    def get_active(self, version) -> bool:
        return version.connection.active_rules_id == version.pk


class RulesInput(StrictSerializer):
    outgoing = serializers.CharField(allow_blank=True, trim_whitespace=False, max_length=100_000)
    incoming = serializers.CharField(allow_blank=True, trim_whitespace=False, max_length=100_000)
    comment = serializers.CharField(allow_blank=True, required=False, default="", max_length=300)
    activate = serializers.BooleanField(required=False, default=True)


class RulesVersions(APIView):
    """GET the versions of a connection's rules; POST new rules (a new version, active by default)."""

    permission_classes = [StaffReadsAdminWrites]

    def get(self, request, pk: int):
        connection = generics.get_object_or_404(Connection, pk=pk)
        versions = connection.rules_versions.select_related("author", "connection").order_by("-number")
        return Response({"results": RulesVersionSerializer(versions, many=True).data})

    def post(self, request, pk: int):
        connection = generics.get_object_or_404(Connection, pk=pk)
        data = RulesInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            version = rules.save_rules(connection, **data.validated_data, author=request.user)
        except rules.RulesError as e:
            return Response(
                {"error": str(e), "fields": {e.error.script: [str(e)]}, "line": e.error.line},
                status=status.HTTP_400_BAD_REQUEST,
            )
        version.connection.refresh_from_db()
        return Response(RulesVersionSerializer(version).data, status=status.HTTP_201_CREATED)


class ActivateRulesVersion(APIView):
    """Rollback: make an older (or any) version of the rules the active one."""

    permission_classes = [StaffReadsAdminWrites]

    def post(self, request, pk: int, number: int):
        version = generics.get_object_or_404(
            RulesVersion.objects.select_related("connection"), connection_id=pk, number=number
        )
        rules.activate(version)
        version.connection.refresh_from_db()
        return Response(RulesVersionSerializer(version).data)
