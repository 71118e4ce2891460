from django.db import migrations


def add_gadget(apps, schema_editor):
    # A data migration writing right after the rename: with the old trigger
    # function (which reads "name") still attached, this insert would fail.
    Gadget = apps.get_model("evolving", "Gadget")
    Gadget.objects.using(schema_editor.connection.alias).create(title="from data migration")


class Migration(migrations.Migration):
    dependencies = [("evolving", "0002_gadget_colour")]

    operations = [
        migrations.RenameField(model_name="gadget", old_name="name", new_name="title"),
        migrations.RunPython(add_gadget, migrations.RunPython.noop),
    ]
