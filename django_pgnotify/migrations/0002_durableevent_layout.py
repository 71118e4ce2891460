from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("django_pgnotify", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="durableevent",
            name="layout",
            field=models.TextField(blank=True, db_default="", default=""),
        ),
    ]
