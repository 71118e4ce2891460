from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("evolving", "0004_gadget_price_decimal")]

    operations = [
        migrations.RemoveField(model_name="gadget", name="colour"),
    ]
