from django.apps import AppConfig


class BuiltinTrackerConfig(AppConfig):
    name = "trackers.builtin"
    label = "builtin"
    verbose_name = "Built-in tracker"
