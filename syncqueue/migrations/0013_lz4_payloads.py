from django.db import migrations

# The queue's big JSON values (an event's payload, a twin's last replicas both ways) are
# compressed by PostgreSQL as they are written; pglz cost several per cent of a bulk sync's
# database CPU, lz4 a fraction of that. Values written before keep their compression.
COLUMNS = (
    ("syncqueue_syncevent", "payload"),
    ("syncqueue_twin", "last_sent"),
    ("syncqueue_twin", "last_received"),
)


def _lz4_available(cursor) -> bool:
    # PostgreSQL 14 and later, built with lz4 (as Debian's and the official images are).
    cursor.execute("SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)")
    return cursor.fetchone() is not None


def compress_with(method):
    def run(apps, schema_editor):
        connection = schema_editor.connection
        if connection.vendor != "postgresql":
            return
        with connection.cursor() as cursor:
            if method == "lz4" and not _lz4_available(cursor):
                return
            for table, column in COLUMNS:
                cursor.execute(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" SET COMPRESSION {method}')

    return run


class Migration(migrations.Migration):
    dependencies = [("syncqueue", "0012_fewer_indexes")]

    operations = [migrations.RunPython(compress_with("lz4"), compress_with("default"))]
