from django.db import migrations, models

# Claims read the pending rows of each declaration they serve: the pending index is keyed
# by declaration first, so that the pending rows of declarations a listener does not
# serve are not read (the claim no longer reads pending rows in id order across all).
# Building it locks out writes to the table meanwhile: migrate while the backlog is small.


class Migration(migrations.Migration):
    dependencies = [
        ("django_pgnotify", "0004_durableevent_size_handled"),
    ]

    operations = [
        migrations.RemoveIndex(model_name="durableevent", name="pgnotify_event_pending"),
        migrations.AddIndex(
            model_name="durableevent",
            index=models.Index(
                condition=models.Q(("status", "pending")),
                fields=["declaration", "id"],
                name="pgnotify_event_pending",
            ),
        ),
    ]
