from django.db import migrations, models

# Claiming a row rewrites it (lease and attempts). With room left on its page the new
# version goes there as a heap-only (HOT) update, adding no index entry; a bulk write
# fills pages completely unless the table keeps room. A claim takes rows in id order,
# that is whole pages, so half of each page is kept free. Applies to pages written
# from now on.
FILLFACTOR = 50


class Migration(migrations.Migration):
    dependencies = [
        ("django_pgnotify", "0002_durableevent_layout"),
    ]

    operations = [
        # jsonb to text keeps what earlier releases stored (as jsonb renders it).
        migrations.AlterField(
            model_name="durableevent",
            name="payload",
            field=models.TextField(),
        ),
        migrations.RunSQL(
            f"ALTER TABLE pgnotify_event SET (fillfactor = {FILLFACTOR})",
            "ALTER TABLE pgnotify_event RESET (fillfactor)",
        ),
    ]
