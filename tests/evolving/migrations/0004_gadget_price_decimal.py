from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("evolving", "0003_rename_name_title")]

    operations = [
        migrations.AlterField(
            model_name="gadget",
            name="price",
            field=models.DecimalField(decimal_places=2, default=0, max_digits=10),
        ),
    ]
