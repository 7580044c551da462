from syncqueue import health

# The pages about syncing show the banner; issue pages stay one query lighter.
SYNC_PAGES = {"connections", "sync"}


def tracker_health(request):
    """The local tracker's problem, if any, for the banner staff see on the sync pages."""
    match = getattr(request, "resolver_match", None)
    if match is None or match.app_name not in SYNC_PAGES:
        return {}
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated or not user.is_staff:
        return {}
    return {"tracker_problem": health.problem()}
