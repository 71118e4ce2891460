from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Note",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False)),
                ("text", models.CharField(max_length=50)),
            ],
        ),
        migrations.CreateModel(
            name="Memo",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False)),
                ("text", models.CharField(max_length=50)),
            ],
        ),
        migrations.CreateModel(
            name="NoteSummary",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False)),
                ("text", models.CharField(max_length=50)),
            ],
            options={"db_table": "oddtables_note_summary", "managed": False},
        ),
        migrations.RunSQL(
            "CREATE VIEW oddtables_note_summary AS SELECT id, text FROM oddtables_note",
            "DROP VIEW oddtables_note_summary",
        ),
    ]
