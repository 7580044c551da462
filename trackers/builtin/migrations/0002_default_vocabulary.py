from django.db import migrations

STATUSES = [("Open", "todo"), ("In Progress", "in_progress"), ("Resolved", "done"), ("Closed", "done")]
PRIORITIES = ["Lowest", "Low", "Medium", "High", "Highest"]


def add_defaults(apps, schema_editor):
    Status = apps.get_model("builtin", "Status")
    Priority = apps.get_model("builtin", "Priority")
    if not Status.objects.exists():
        for position, (name, category) in enumerate(STATUSES):
            Status.objects.create(name=name, category=category, position=position)
    if not Priority.objects.exists():
        for position, name in enumerate(PRIORITIES):
            Priority.objects.create(name=name, position=position, is_default=name == "Medium")


class Migration(migrations.Migration):
    dependencies = [("builtin", "0001_initial")]
    operations = [migrations.RunPython(add_defaults, migrations.RunPython.noop)]
