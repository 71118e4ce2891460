from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("evolving", "0001_initial")]

    operations = [
        migrations.AddField(
            model_name="gadget",
            name="colour",
            field=models.CharField(default="red", max_length=20),
        ),
    ]
