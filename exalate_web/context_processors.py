from django.conf import settings


def node(request):
    return {"node_name": settings.NODE_NAME, "node_url": settings.NODE_URL}
