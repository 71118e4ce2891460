from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("evolving", "0005_remove_gadget_colour")]

    operations = [
        migrations.DeleteModel(name="Part"),
    ]
