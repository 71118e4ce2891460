from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("benchapp", "0002_rowitem"),
    ]

    operations = [
        migrations.CreateModel(
            name="NewValuesItem",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("a", models.IntegerField()),
                ("b", models.CharField(max_length=50)),
                ("c", models.IntegerField()),
                ("d", models.IntegerField()),
            ],
        ),
    ]
