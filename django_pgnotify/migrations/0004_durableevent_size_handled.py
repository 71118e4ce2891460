from django.db import migrations, models

import django_pgnotify.models

# One event row holds the changes of a statement, up to DURABLE_ID_STEP of them, and
# the change at position i has the event id ``id + i``: ids are spaced that far apart.
# Rows written before hold one change each (size 1), so their event ids stay theirs.
ID_STEP = 1024


class Migration(migrations.Migration):
    dependencies = [
        ("django_pgnotify", "0003_durableevent_payload_text"),
    ]

    operations = [
        migrations.AddField(
            model_name="durableevent",
            name="size",
            field=models.PositiveIntegerField(
                db_default=1, default=1, help_text="How many changes the payload holds."
            ),
        ),
        migrations.AddField(
            model_name="durableevent",
            name="handled",
            field=django_pgnotify.models.PositionsField(blank=True, null=True),
        ),
        migrations.RunSQL(
            f"ALTER TABLE pgnotify_event ALTER COLUMN id SET INCREMENT BY {ID_STEP}",
            "ALTER TABLE pgnotify_event ALTER COLUMN id SET INCREMENT BY 1",
        ),
    ]
